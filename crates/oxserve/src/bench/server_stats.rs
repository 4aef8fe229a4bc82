//! The server side of a point: totals from Triton's statistics extension (or the engine's own
//! statistics in process), and the average breakdown per request between two snapshots.

use std::time::Duration;

use anyhow::{Context, bail};
use oxserve_engine::{InferenceService, ModelStatistics};
use serde::{Deserialize, Serialize};

use super::options::{BenchArgs, BenchProtocol};

/// Average server-side time per request over the reported windows, from the statistics
/// extension.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ServerBreakdown {
    /// Successful requests the server counted.
    pub requests: u64,
    pub queue_us: f64,
    pub compute_input_us: f64,
    pub compute_infer_us: f64,
    pub compute_output_us: f64,
    /// Engine executions, and rows per execution (> 1 means dynamic batching formed batches).
    pub executions: u64,
    pub avg_batch_size: f64,
}

/// Sums of the statistics of every version of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerTotals {
    success: u64,
    queue: (u64, u64),
    compute_input: (u64, u64),
    compute_infer: (u64, u64),
    compute_output: (u64, u64),
    inference_count: u64,
    execution_count: u64,
}

#[derive(Deserialize)]
struct StatsJson {
    #[serde(default)]
    model_stats: Vec<ModelStatJson>,
}

#[derive(Deserialize, Default)]
struct DurationJson {
    #[serde(default)]
    count: u64,
    #[serde(default)]
    ns: u64,
}

#[derive(Deserialize, Default)]
struct InferStatsJson {
    #[serde(default)]
    success: DurationJson,
    #[serde(default)]
    queue: DurationJson,
    #[serde(default)]
    compute_input: DurationJson,
    #[serde(default)]
    compute_infer: DurationJson,
    #[serde(default)]
    compute_output: DurationJson,
}

#[derive(Deserialize)]
struct ModelStatJson {
    #[serde(default)]
    inference_count: u64,
    #[serde(default)]
    execution_count: u64,
    #[serde(default)]
    inference_stats: InferStatsJson,
}

impl ServerTotals {
    /// From Triton's statistics JSON (`GET /v2/models/{m}/stats`).
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let stats: StatsJson = serde_json::from_str(text).context("malformed statistics")?;
        let mut t = ServerTotals::default();
        for m in stats.model_stats {
            let s = m.inference_stats;
            t.success += s.success.count;
            add(&mut t.queue, &s.queue);
            add(&mut t.compute_input, &s.compute_input);
            add(&mut t.compute_infer, &s.compute_infer);
            add(&mut t.compute_output, &s.compute_output);
            t.inference_count += m.inference_count;
            t.execution_count += m.execution_count;
        }
        Ok(t)
    }

    fn from_engine(stats: &[ModelStatistics]) -> Self {
        let mut t = ServerTotals::default();
        for m in stats {
            let s = &m.inference_stats;
            t.success += s.success.count;
            t.queue = (t.queue.0 + s.queue.count, t.queue.1 + s.queue.ns);
            t.compute_input = (
                t.compute_input.0 + s.compute_input.count,
                t.compute_input.1 + s.compute_input.ns,
            );
            t.compute_infer = (
                t.compute_infer.0 + s.compute_infer.count,
                t.compute_infer.1 + s.compute_infer.ns,
            );
            t.compute_output = (
                t.compute_output.0 + s.compute_output.count,
                t.compute_output.1 + s.compute_output.ns,
            );
            t.inference_count += m.inference_count;
            t.execution_count += m.execution_count;
        }
        t
    }

    /// Averages per request between two snapshots (`None` when nothing ran in between).
    pub fn breakdown_since(&self, before: &ServerTotals) -> Option<ServerBreakdown> {
        let avg_us = |after: (u64, u64), before: (u64, u64)| {
            let count = after.0.saturating_sub(before.0);
            if count == 0 {
                0.0
            } else {
                after.1.saturating_sub(before.1) as f64 / count as f64 / 1000.0
            }
        };
        let requests = self.success.saturating_sub(before.success);
        if requests == 0 {
            return None;
        }
        let executions = self.execution_count.saturating_sub(before.execution_count);
        let rows = self.inference_count.saturating_sub(before.inference_count);
        Some(ServerBreakdown {
            requests,
            queue_us: avg_us(self.queue, before.queue),
            compute_input_us: avg_us(self.compute_input, before.compute_input),
            compute_infer_us: avg_us(self.compute_infer, before.compute_infer),
            compute_output_us: avg_us(self.compute_output, before.compute_output),
            executions,
            avg_batch_size: if executions == 0 {
                0.0
            } else {
                rows as f64 / executions as f64
            },
        })
    }
}

fn add(acc: &mut (u64, u64), d: &DurationJson) {
    acc.0 += d.count;
    acc.1 += d.ns;
}

/// Where the server's statistics come from.
pub(super) enum StatsSource {
    Http { client: reqwest::Client, url: String },
    InProcess(InferenceService),
    None,
}

impl StatsSource {
    pub(super) async fn new(
        args: &BenchArgs,
        protocol: BenchProtocol,
        engine: Option<&InferenceService>,
    ) -> Self {
        if protocol == BenchProtocol::InProcess {
            return match engine {
                Some(e) => StatsSource::InProcess(e.clone()),
                None => StatsSource::None,
            };
        }
        let Ok(client) = super::headers::http_client()
            .timeout(Duration::from_secs(5))
            .build()
        else {
            return StatsSource::None;
        };
        let url = format!(
            "{}/v2/models/{}/stats",
            args.http_url.trim_end_matches('/'),
            args.model
        );
        let source = StatsSource::Http { client, url };
        match source.fetch().await {
            Ok(_) => source,
            Err(e) => {
                eprintln!("note: no server-side breakdown ({e:#})");
                StatsSource::None
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<ServerTotals> {
        match self {
            StatsSource::Http { client, url } => {
                let resp = client
                    .get(url.as_str())
                    .send()
                    .await
                    .with_context(|| format!("GET {url}"))?;
                let status = resp.status();
                let text = resp.text().await?;
                if !status.is_success() {
                    bail!("GET {url}: HTTP {status}");
                }
                ServerTotals::from_json(&text)
            }
            StatsSource::InProcess(engine) => {
                Ok(ServerTotals::from_engine(&engine.model_statistics(None, None)?))
            }
            StatsSource::None => bail!("no statistics source"),
        }
    }

    pub(super) async fn snapshot(&self) -> Option<ServerTotals> {
        self.fetch().await.ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn server_breakdown_from_triton_statistics() {
        let before = ServerTotals::from_json(
            r#"{"model_stats":[{"name":"m","version":"1","inference_count":10,"execution_count":5,
                "inference_stats":{"success":{"count":10,"ns":1000000},"fail":{"count":0,"ns":0},
                "queue":{"count":10,"ns":100000},"compute_input":{"count":10,"ns":10000},
                "compute_infer":{"count":10,"ns":500000},"compute_output":{"count":10,"ns":20000}},
                "batch_stats":[]}]}"#,
        )
        .unwrap();
        let after = ServerTotals::from_json(
            r#"{"model_stats":[{"name":"m","version":"1","inference_count":110,"execution_count":30,
                "inference_stats":{"success":{"count":110,"ns":9000000},
                "queue":{"count":110,"ns":300000},"compute_input":{"count":110,"ns":110000},
                "compute_infer":{"count":110,"ns":2500000},"compute_output":{"count":110,"ns":220000}}},
               {"name":"m","version":"2","inference_count":0,"execution_count":0,"inference_stats":{}}]}"#,
        )
        .unwrap();
        let b = after.breakdown_since(&before).unwrap();
        assert_eq!(b.requests, 100);
        assert!((b.queue_us - 2.0).abs() < 1e-9);
        assert!((b.compute_input_us - 1.0).abs() < 1e-9);
        assert!((b.compute_infer_us - 20.0).abs() < 1e-9);
        assert!((b.compute_output_us - 2.0).abs() < 1e-9);
        assert_eq!(b.executions, 25);
        assert!((b.avg_batch_size - 4.0).abs() < 1e-9);
        assert!(before.breakdown_since(&before).is_none());
        assert!(ServerTotals::from_json("not json").is_err());
    }
}
