//! Turning a model configuration's `dynamic_batching` and `instance_group` into the
//! scheduler's settings, with the checks Triton makes at load.

use std::collections::HashMap;
use std::time::Duration;

use oxserve_repository::pb::model_config::SchedulingChoice;
use oxserve_repository::pb::model_queue_policy::TimeoutAction as PbTimeoutAction;
use oxserve_repository::pb::{ModelConfig, ModelQueuePolicy};
use oxserve_scheduler::{DynamicBatching, QueuePolicy, SchedulerConfig, TimeoutAction};

fn queue_policy(p: Option<&ModelQueuePolicy>) -> QueuePolicy {
    let Some(p) = p else { return QueuePolicy::default() };
    QueuePolicy {
        timeout_action: if p.timeout_action == PbTimeoutAction::Delay as i32 {
            TimeoutAction::Delay
        } else {
            TimeoutAction::Reject
        },
        default_timeout: (p.default_timeout_microseconds > 0)
            .then(|| Duration::from_micros(p.default_timeout_microseconds)),
        allow_timeout_override: p.allow_timeout_override,
        max_queue_size: p.max_queue_size as usize,
    }
}

pub(crate) fn scheduler_config(
    cfg: &ModelConfig,
    instances: usize,
    max_queued_total: usize,
    thread_name: String,
) -> Result<SchedulerConfig, String> {
    let max_batch_size = usize::try_from(cfg.max_batch_size).unwrap_or(0);
    let mut out = SchedulerConfig {
        instances,
        max_batch_size,
        max_queued_total,
        thread_name,
        ..SchedulerConfig::default()
    };
    let Some(SchedulingChoice::DynamicBatching(db)) = &cfg.scheduling_choice else {
        return Ok(out);
    };
    if max_batch_size == 0 {
        return Err("dynamic_batching needs max_batch_size > 0".into());
    }
    let mut preferred = Vec::with_capacity(db.preferred_batch_size.len());
    for &p in &db.preferred_batch_size {
        if p <= 0 || p as usize > max_batch_size {
            return Err(format!(
                "dynamic_batching preferred_batch_size {p} must be between 1 and max_batch_size {max_batch_size}"
            ));
        }
        preferred.push(p as usize);
    }
    if db.priority_levels > 0 && !(1..=db.priority_levels).contains(&db.default_priority_level) {
        return Err(format!(
            "dynamic_batching default_priority_level {} must be between 1 and priority_levels {}",
            db.default_priority_level, db.priority_levels
        ));
    }
    let mut per_level = HashMap::new();
    for (&level, policy) in &db.priority_queue_policy {
        if level == 0 || level > db.priority_levels {
            return Err(format!(
                "dynamic_batching priority_queue_policy for level {level}, but priority_levels is {}",
                db.priority_levels
            ));
        }
        per_level.insert(level, queue_policy(Some(policy)));
    }
    out.dynamic_batching = Some(DynamicBatching {
        preferred_batch_sizes: preferred,
        max_queue_delay: Duration::from_micros(db.max_queue_delay_microseconds),
        preserve_ordering: db.preserve_ordering,
    });
    out.priority_levels = db.priority_levels;
    out.default_priority_level = db.default_priority_level;
    out.default_queue_policy = queue_policy(db.default_queue_policy.as_ref());
    out.priority_queue_policy = per_level;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxserve_repository::parse_config_text;

    fn config(text: &str) -> Result<SchedulerConfig, String> {
        scheduler_config(&parse_config_text(text).unwrap(), 2, 100, "t".into())
    }

    #[test]
    fn triton_dynamic_batching_maps_to_the_scheduler() {
        let c = config(
            r#"max_batch_size: 8
               dynamic_batching {
                 preferred_batch_size: [4, 8]
                 max_queue_delay_microseconds: 100
                 preserve_ordering: true
                 priority_levels: 2
                 default_priority_level: 2
                 default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 500 allow_timeout_override: true max_queue_size: 3 }
                 priority_queue_policy { key: 1 value { max_queue_size: 7 } }
               }"#,
        )
        .unwrap();
        let db = c.dynamic_batching.unwrap();
        assert_eq!(db.preferred_batch_sizes, vec![4, 8]);
        assert_eq!(db.max_queue_delay, Duration::from_micros(100));
        assert!(db.preserve_ordering);
        assert_eq!(
            (c.priority_levels, c.default_priority_level, c.instances),
            (2, 2, 2)
        );
        assert_eq!(c.default_queue_policy.timeout_action, TimeoutAction::Delay);
        assert_eq!(
            c.default_queue_policy.default_timeout,
            Some(Duration::from_micros(500))
        );
        assert!(c.default_queue_policy.allow_timeout_override);
        assert_eq!(c.default_queue_policy.max_queue_size, 3);
        assert_eq!(c.priority_queue_policy[&1].max_queue_size, 7);
    }

    #[test]
    fn inconsistent_batching_settings_are_load_errors() {
        assert!(
            config("max_batch_size: 0 dynamic_batching {}")
                .unwrap_err()
                .contains("max_batch_size > 0")
        );
        assert!(
            config("max_batch_size: 4 dynamic_batching { preferred_batch_size: 8 }")
                .unwrap_err()
                .contains("8")
        );
        assert!(
            config("max_batch_size: 4 dynamic_batching { priority_levels: 2 default_priority_level: 3 }")
                .unwrap_err()
                .contains("default_priority_level")
        );
        assert!(config("max_batch_size: 4").unwrap().dynamic_batching.is_none());
    }
}
