//! Rate limits: token buckets (`governor`'s GCRA) per API key and per client address, set per
//! endpoint group and optionally per model by `[[rate_limits]]` rules in the settings file.
//!
//! Every rule that matches a request is checked; the first one whose bucket is empty refuses
//! it, with the time until a token is free (Retry-After). The number of buckets a rule keeps is
//! bounded: idle buckets are dropped by [`RateLimits::housekeeping`], and once a rule tracks
//! [`MAX_TRACKED_CLIENTS`] clients, further new clients share one overflow bucket, so a client
//! rotating addresses cannot grow the server's memory.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};

use crate::routes::{ModelRef, Scope};

/// Buckets one rule keeps per kind (keys, addresses) before new clients share one.
pub const MAX_TRACKED_CLIENTS: usize = 65_536;

/// One `[[rate_limits]]` table of the settings file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    /// An endpoint group (`infer`, `metadata`, `health`, `repository`, `shared_memory`,
    /// `metrics`, `statistics`) or `all`.
    pub group: String,
    /// Only requests for this model; unset: the whole group, all models together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Requests per second for each API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_key: Option<f64>,
    /// Requests per second for each client address (IPv6: each /64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_address: Option<f64>,
    /// Requests a client may send at once after being idle; default: one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Who a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Client {
    Key(Arc<str>),
    Address(IpAddr),
    /// The connection's address is not known.
    UnknownAddress,
    /// New clients once a rule tracks [`MAX_TRACKED_CLIENTS`].
    Overflow,
}

/// What a refused request was counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitedBy {
    Key,
    Address,
}

impl LimitedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitedBy::Key => "key",
            LimitedBy::Address => "address",
        }
    }
}

/// A refusal: which rule, and when to come back.
#[derive(Debug, Clone)]
pub struct Limited {
    pub group: Arc<str>,
    pub model: Arc<str>,
    pub by: LimitedBy,
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds for the Retry-After header, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

type Limiter = DefaultKeyedRateLimiter<Client>;

struct Rule {
    /// `None`: every group, unknown endpoints included.
    scope: Option<Scope>,
    model: Option<String>,
    per_key: Option<Limiter>,
    per_address: Option<Limiter>,
    group_label: Arc<str>,
    model_label: Arc<str>,
}

impl Rule {
    fn matches(&self, scope: Option<Scope>, model: &ModelRef) -> bool {
        if self.scope.is_some() && self.scope != scope {
            return false;
        }
        match (&self.model, model) {
            (None, _) => true,
            (Some(wanted), ModelRef::Named(m)) => wanted == m,
            // A model that could not be read from the request counts against every
            // per-model rule of its group, so hiding the name cannot dodge a limit.
            (Some(_), ModelRef::InBody) => true,
            (Some(_), ModelRef::NotApplicable) => false,
        }
    }
}

/// The compiled rules.
#[derive(Default)]
pub struct RateLimits {
    rules: Vec<Rule>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("rules", &self.rules.len())
            .finish()
    }
}

fn limiter(rate: f64, burst: Option<u32>) -> Result<Limiter, String> {
    if !rate.is_finite() || rate <= 0.0 {
        return Err(format!(
            "a rate must be a positive number of requests per second, not {rate}"
        ));
    }
    let period = Duration::try_from_secs_f64(1.0 / rate)
        .ok()
        .filter(|p| !p.is_zero())
        .ok_or_else(|| format!("rate {rate} per second is out of range"))?;
    // Default burst: one second's worth of requests (at least one).
    let burst = burst.unwrap_or_else(|| rate.ceil().min(f64::from(u32::MAX)) as u32);
    let burst = NonZeroU32::new(burst).ok_or("'burst' must be at least 1")?;
    let quota = Quota::with_period(period)
        .ok_or_else(|| format!("rate {rate} per second is out of range"))?
        .allow_burst(burst);
    Ok(Limiter::dashmap(quota))
}

impl RateLimits {
    /// Checks and compiles the rules; an error names the rule (1-based) and what is wrong.
    pub fn new(rules: &[RateLimitRule]) -> Result<RateLimits, String> {
        let compiled = rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile(r).map_err(|m| format!("[[rate_limits]] rule {}: {m}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RateLimits {
            rules: compiled,
            clock: DefaultClock::default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether some rule for this group depends on the model, so the caller must find it
    /// (in a gRPC message) before [`check`](Self::check).
    pub fn needs_model(&self, scope: Option<Scope>) -> bool {
        self.rules
            .iter()
            .any(|r| r.model.is_some() && (r.scope.is_none() || r.scope == scope))
    }

    /// Takes a token from every matching bucket, or says which one is empty. `key`: the API
    /// key's name, when the request carried one; `address`: the client's, when known.
    pub fn check(
        &self,
        scope: Option<Scope>,
        model: &ModelRef,
        key: Option<&Arc<str>>,
        address: Option<IpAddr>,
    ) -> Result<(), Limited> {
        for rule in self.rules.iter().filter(|r| r.matches(scope, model)) {
            if let (Some(limiter), Some(key)) = (&rule.per_key, key) {
                self.take(rule, limiter, Client::Key(key.clone()), LimitedBy::Key)?;
            }
            if let Some(limiter) = &rule.per_address {
                let client = address.map_or(Client::UnknownAddress, |a| Client::Address(bucket_address(a)));
                self.take(rule, limiter, client, LimitedBy::Address)?;
            }
        }
        Ok(())
    }

    fn take(&self, rule: &Rule, limiter: &Limiter, client: Client, by: LimitedBy) -> Result<(), Limited> {
        let client = if limiter.len() >= MAX_TRACKED_CLIENTS {
            Client::Overflow
        } else {
            client
        };
        limiter.check_key(&client).map_err(|not_until| Limited {
            group: rule.group_label.clone(),
            model: rule.model_label.clone(),
            by,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Drops buckets that are full again (indistinguishable from new ones); run periodically.
    pub fn housekeeping(&self) {
        for limiter in self
            .rules
            .iter()
            .flat_map(|r| [&r.per_key, &r.per_address])
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Buckets held, over all rules (for tests and diagnostics).
    pub fn tracked_clients(&self) -> usize {
        self.rules
            .iter()
            .flat_map(|r| [&r.per_key, &r.per_address])
            .flatten()
            .map(|l| l.len())
            .sum()
    }
}

fn compile(rule: &RateLimitRule) -> Result<Rule, String> {
    let scope = match rule.group.as_str() {
        "all" => None,
        name => Some(Scope::parse(name).ok_or_else(|| {
            let valid: Vec<_> = Scope::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown group '{name}' (valid: {}, all)", valid.join(", "))
        })?),
    };
    if rule.per_key.is_none() && rule.per_address.is_none() {
        return Err("set 'per_key', 'per_address' or both (requests per second)".into());
    }
    if rule.model.as_deref().is_some_and(str::is_empty) {
        return Err("'model' is empty".into());
    }
    Ok(Rule {
        scope,
        model: rule.model.clone(),
        per_key: rule.per_key.map(|r| limiter(r, rule.burst)).transpose()?,
        per_address: rule.per_address.map(|r| limiter(r, rule.burst)).transpose()?,
        group_label: rule.group.as_str().into(),
        model_label: rule.model.as_deref().unwrap_or("").into(),
    })
}

/// The bucket an address falls in: IPv4 addresses each their own, IPv6 by /64 (one host
/// usually owns a whole /64), IPv4-mapped IPv6 as IPv4.
fn bucket_address(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        group: &str,
        model: Option<&str>,
        per_key: Option<f64>,
        per_address: Option<f64>,
        burst: Option<u32>,
    ) -> RateLimitRule {
        RateLimitRule {
            group: group.into(),
            model: model.map(Into::into),
            per_key,
            per_address,
            burst,
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("address"))
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let cases = [
            (
                rule("inference", None, Some(1.0), None, None),
                "unknown group 'inference'",
            ),
            (
                rule("infer", None, None, None, None),
                "set 'per_key', 'per_address'",
            ),
            (rule("infer", None, Some(0.0), None, None), "positive number"),
            (rule("infer", None, Some(-1.0), None, None), "positive number"),
            (rule("infer", None, Some(f64::NAN), None, None), "positive number"),
            (rule("infer", None, Some(1e-30), None, None), "out of range"),
            (
                rule("infer", None, Some(1.0), None, Some(0)),
                "'burst' must be at least 1",
            ),
            (rule("infer", Some(""), Some(1.0), None, None), "'model' is empty"),
        ];
        for (r, expected) in cases {
            let e =
                RateLimits::new(&[rule("all", None, Some(5.0), None, None), r.clone()]).expect_err(expected);
            assert!(
                e.starts_with("[[rate_limits]] rule 2: ") && e.contains(expected),
                "{r:?}: {e}"
            );
        }
    }

    #[test]
    fn per_key_buckets_are_separate_and_refill() {
        let limits = RateLimits::new(&[rule("infer", None, Some(1000.0), None, Some(3))]).expect("valid");
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let model = ModelRef::Named("m".into());
        for _ in 0..3 {
            assert!(limits.check(Some(Scope::Infer), &model, Some(&a), None).is_ok());
        }
        let limited = limits
            .check(Some(Scope::Infer), &model, Some(&a), None)
            .expect_err("bucket empty");
        assert_eq!(
            (limited.by, &*limited.group, &*limited.model),
            (LimitedBy::Key, "infer", "")
        );
        assert!(
            limited.retry_after <= Duration::from_millis(1),
            "{:?}",
            limited.retry_after
        );
        assert_eq!(limited.retry_after_secs(), 1);
        // Another key has its own bucket; other groups are not limited; no key: no per-key rule.
        assert!(limits.check(Some(Scope::Infer), &model, Some(&b), None).is_ok());
        assert!(
            limits
                .check(Some(Scope::Metadata), &model, Some(&a), None)
                .is_ok()
        );
        assert!(limits.check(Some(Scope::Infer), &model, None, None).is_ok());
        std::thread::sleep(Duration::from_millis(5));
        assert!(limits.check(Some(Scope::Infer), &model, Some(&a), None).is_ok());
    }

    #[test]
    fn per_address_and_per_model() {
        let limits = RateLimits::new(&[rule("all", Some("slow"), None, Some(0.5), Some(1))]).expect("valid");
        let slow = ModelRef::Named("slow".into());
        let fast = ModelRef::Named("fast".into());
        assert!(
            limits
                .check(Some(Scope::Infer), &slow, None, ip("10.0.0.1"))
                .is_ok()
        );
        let limited = limits
            .check(Some(Scope::Infer), &slow, None, ip("10.0.0.1"))
            .expect_err("limited");
        assert_eq!((limited.by, &*limited.model), (LimitedBy::Address, "slow"));
        assert_eq!(limited.retry_after_secs(), 2);
        // The model's other endpoints (group "all") share the bucket; other models and
        // endpoints about no model are free; another address has its own bucket.
        assert!(
            limits
                .check(Some(Scope::Metadata), &slow, None, ip("10.0.0.1"))
                .is_err()
        );
        assert!(
            limits
                .check(Some(Scope::Infer), &fast, None, ip("10.0.0.1"))
                .is_ok()
        );
        assert!(
            limits
                .check(
                    Some(Scope::Health),
                    &ModelRef::NotApplicable,
                    None,
                    ip("10.0.0.1")
                )
                .is_ok()
        );
        assert!(
            limits
                .check(Some(Scope::Infer), &slow, None, ip("10.0.0.2"))
                .is_ok()
        );
        // A model still in a gRPC body counts against the per-model rule.
        assert!(
            limits
                .check(Some(Scope::Infer), &ModelRef::InBody, None, ip("10.0.0.2"))
                .is_err()
        );
        assert!(limits.needs_model(Some(Scope::Infer)));
        // Unknown addresses share one bucket.
        assert!(limits.check(Some(Scope::Infer), &slow, None, None).is_ok());
        assert!(limits.check(Some(Scope::Infer), &slow, None, None).is_err());
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let limits = RateLimits::new(&[rule("infer", None, None, Some(0.1), Some(1))]).expect("valid");
        let m = ModelRef::Named("m".into());
        assert!(
            limits
                .check(Some(Scope::Infer), &m, None, ip("2001:db8:1:2::1"))
                .is_ok()
        );
        assert!(
            limits
                .check(Some(Scope::Infer), &m, None, ip("2001:db8:1:2:ffff::9"))
                .is_err()
        );
        assert!(
            limits
                .check(Some(Scope::Infer), &m, None, ip("2001:db8:1:3::1"))
                .is_ok()
        );
        assert!(
            limits
                .check(Some(Scope::Infer), &m, None, ip("::ffff:10.1.1.1"))
                .is_ok()
        );
        assert!(
            limits
                .check(Some(Scope::Infer), &m, None, ip("10.1.1.1"))
                .is_err()
        );
    }

    #[test]
    fn rotating_addresses_cannot_grow_memory() {
        let limits = RateLimits::new(&[rule("infer", None, None, Some(1.0), Some(1))]).expect("valid");
        let m = ModelRef::Named("m".into());
        let clients = MAX_TRACKED_CLIENTS as u32 + 1000;
        let mut refused = 0;
        for i in 0..clients {
            let address = IpAddr::V4((0x0a00_0000 + i).into());
            if limits.check(Some(Scope::Infer), &m, None, Some(address)).is_err() {
                refused += 1;
            }
        }
        // At most one bucket per tracked client plus the shared overflow bucket, which
        // lets one request through and refuses the rest.
        assert_eq!(limits.tracked_clients(), MAX_TRACKED_CLIENTS + 1);
        assert_eq!(refused, 999);
        // Buckets that refill are dropped by housekeeping (here: those not yet refilled stay).
        limits.housekeeping();
        assert!(limits.tracked_clients() <= MAX_TRACKED_CLIENTS + 1);
    }

    #[test]
    fn rules_read_from_toml() {
        #[derive(Deserialize)]
        struct File {
            rate_limits: Vec<RateLimitRule>,
        }
        let f: File = toml::from_str(
            "[[rate_limits]]\ngroup = \"infer\"\nmodel = \"resnet\"\nper_key = 100\nper_address = 20.5\nburst = 10\n",
        )
        .expect("valid");
        assert_eq!(
            f.rate_limits,
            vec![rule("infer", Some("resnet"), Some(100.0), Some(20.5), Some(10))]
        );
        assert!(toml::from_str::<File>("[[rate_limits]]\ngroup = \"infer\"\nper_second = 1\n").is_err());
    }
}
