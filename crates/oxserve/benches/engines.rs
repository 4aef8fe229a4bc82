//! In-process engine throughput: ONNX Runtime vs tract on the same ONNX files, through the
//! backend contract only (`Backend::load`, one `ModelInstance`, `execute` in a loop): no
//! server, no scheduler, no protocol. This is the baseline the server's end-to-end figures are
//! compared with (bench/engines.sh runs both in one go; see BENCHMARKS.md).
//!
//! ```text
//! cargo bench -p oxserve --bench engines -- --corpus tests/fixtures/corpus \
//!     [--models cnn,transformer] [--engines onnxruntime,tract] [--batches 1,8,32] \
//!     [--seq 64] [--seconds 5] [--instances 1] [--param KEY=VALUE ...] [--json]
//! ```
//!
//! Engines run as the server configures them: ONNX Runtime with `max(1, cores / instances)`
//! intra-op threads, tract single-threaded. With `--instances N`, N instances of the model run
//! the same batch side by side, each in a loop on its own thread (what a server's instance group
//! does), and the items of all are counted. Inputs are random
//! (uniform in [-1, 1) for floats; token ids in [0, 1000) for the transformer, whose variable
//! sequence length is fixed by `--seq`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxserve_backend::{Backend, Batch, LoadSpec, ModelInstance};
use oxserve_core::{DataType, Tensor, TensorMeta};
use rand::Rng;

struct Args {
    corpus: PathBuf,
    models: Vec<String>,
    engines: Vec<String>,
    batches: Vec<i64>,
    seq: i64,
    seconds: f64,
    instances: usize,
    json: bool,
    /// Model configuration parameters for ONNX Runtime (`--param KEY=VALUE`, repeatable).
    params: BTreeMap<String, String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        corpus: PathBuf::from("tests/fixtures/corpus"),
        models: vec!["cnn".into(), "transformer".into()],
        engines: vec!["onnxruntime".into(), "tract".into()],
        batches: vec![1, 8, 32],
        seq: 64,
        seconds: 5.0,
        instances: 1,
        json: false,
        params: BTreeMap::new(),
    };
    let list = |v: String| v.split(',').map(str::to_string).collect::<Vec<_>>();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--corpus" => args.corpus = PathBuf::from(value()),
            "--models" => args.models = list(value()),
            "--engines" => args.engines = list(value()),
            "--batches" => args.batches = list(value()).iter().map(|b| b.parse().expect("batch")).collect(),
            "--seq" => args.seq = value().parse().expect("--seq"),
            "--seconds" => args.seconds = value().parse().expect("--seconds"),
            "--instances" => args.instances = value().parse().expect("--instances"),
            "--json" => args.json = true,
            "--param" => {
                let kv = value();
                let (k, v) = kv.split_once('=').expect("--param KEY=VALUE");
                args.params.insert(k.to_string(), v.to_string());
            }
            // cargo bench passes --bench to every harness=false target.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

fn backend(name: &str) -> Box<dyn Backend> {
    match name {
        "onnxruntime" => Box::new(oxserve_onnxruntime::OrtBackend::new(Default::default())),
        "tract" => Box::new(oxserve_tract::TractBackend::new()),
        other => panic!("unknown engine {other}"),
    }
}

/// A batch of random inputs with the signature's shapes, `batch` rows, `seq` for other
/// variable dimensions.
fn inputs(inputs: &[TensorMeta], batch: i64, seq: i64) -> Vec<Tensor> {
    let mut rng = rand::rng();
    inputs
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match (i, d) {
                    (_, d) if d >= 0 => d,
                    (0, _) => batch,
                    _ => seq,
                })
                .collect();
            let n = shape.iter().product::<i64>() as usize;
            let raw: Vec<u8> = match t.datatype {
                DataType::F32 => (0..n)
                    .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
                    .collect(),
                DataType::I64 => (0..n)
                    .flat_map(|_| rng.random_range(0i64..1000).to_le_bytes())
                    .collect(),
                other => panic!("input {} is {other}: only FP32 and INT64 are benchmarked", t.name),
            };
            Tensor::from_raw(t.name.clone(), t.datatype, shape, Bytes::from(raw))
        })
        .collect()
}

struct Point {
    model: String,
    engine: String,
    batch: i64,
    /// Instances running side by side.
    instances: usize,
    runs: u64,
    seconds: f64,
    /// CPU time the process used while measuring (all threads), seconds.
    cpu_seconds: f64,
}

impl Point {
    fn items_per_s(&self) -> f64 {
        self.runs as f64 * self.batch as f64 / self.seconds
    }
    /// How long one run takes on its instance.
    fn ms_per_batch(&self) -> f64 {
        self.seconds * 1000.0 * self.instances as f64 / self.runs as f64
    }
    /// Items per CPU-second: what the engine costs, independent of how busy the machine is.
    fn items_per_cpu_s(&self) -> f64 {
        self.runs as f64 * self.batch as f64 / self.cpu_seconds
    }
}

/// CPU time of this process (user + system, all threads) from /proc/self/stat, seconds.
fn process_cpu_seconds() -> f64 {
    // Fields 14 and 15 (utime, stime), in clock ticks of USER_HZ, which is 100 on Linux.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name, field 3 (state) is index 0, so utime (14) is index 11.
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs `batch` in a loop on every instance at once (one thread each) for `seconds`: total runs,
/// elapsed seconds and the process's CPU seconds.
fn measure(instances: &mut [Box<dyn ModelInstance>], batch: &Batch, seconds: f64) -> (u64, f64, f64) {
    // Warm up: first runs allocate and (ONNX Runtime) pick kernels.
    let warm = Duration::from_secs_f64((seconds / 5.0).clamp(0.2, 1.0));
    run_all(instances, batch, warm, 2);
    let cpu = process_cpu_seconds();
    let start = Instant::now();
    let runs = run_all(instances, batch, Duration::from_secs_f64(seconds), 3);
    (runs, start.elapsed().as_secs_f64(), process_cpu_seconds() - cpu)
}

/// Each instance runs `batch` for at least `min_runs` runs and `duration`; total runs.
fn run_all(
    instances: &mut [Box<dyn ModelInstance>],
    batch: &Batch,
    duration: Duration,
    min_runs: u64,
) -> u64 {
    let until = Instant::now() + duration;
    std::thread::scope(|scope| {
        let workers: Vec<_> = instances
            .iter_mut()
            .map(|instance| {
                scope.spawn(move || {
                    let mut runs = 0u64;
                    while runs < min_runs || Instant::now() < until {
                        instance.execute(batch.clone()).expect("run");
                        runs += 1;
                    }
                    runs
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("instance thread"))
            .sum()
    })
}

fn main() {
    let args = parse_args();
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        eprintln!("note: set ORT_DISABLE_TELEMETRY=1 to keep ONNX Runtime from writing usage data");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !args.json {
        println!(
            "{:<12} {:<12} {:>5} {:>8} {:>8} {:>12} {:>10} {:>12}",
            "model", "engine", "batch", "threads", "runs", "items/s", "ms/batch", "items/cpu-s"
        );
    }
    for model in &args.models {
        let path = args.corpus.join("models").join(format!("{model}.onnx"));
        for engine in &args.engines {
            let backend = backend(engine);
            if let Err(e) = backend.availability() {
                panic!("{engine} is not available: {e}");
            }
            let sig = backend
                .inspect(&path)
                .unwrap_or_else(|e| panic!("{engine} {model}: {e}"));
            let spec = LoadSpec {
                model_name: model.clone(),
                version: 1,
                model_path: path.clone(),
                inputs: sig.inputs.clone(),
                outputs: sig.outputs.clone(),
                max_batch_size: 32,
                instance_count: args.instances.max(1),
                devices: vec![],
                graph_optimization_level: 0,
                parameters: args.params.clone(),
                gpu_accelerators: vec![],
            };
            let loaded = backend
                .load(&spec)
                .unwrap_or_else(|e| panic!("{engine} {model}: {e}"));
            let mut instances: Vec<_> = (0..args.instances.max(1))
                .map(|i| loaded.new_instance(i).expect("instance"))
                .collect();
            // Threads per instance, as the server sizes them.
            let threads = if engine == "onnxruntime" {
                (cores / instances.len()).max(1)
            } else {
                1
            };
            for &b in &args.batches {
                let batch = Batch {
                    inputs: inputs(&sig.inputs, b, args.seq),
                    outputs: vec![],
                };
                let (runs, seconds, cpu_seconds) = measure(&mut instances, &batch, args.seconds);
                let p = Point {
                    model: model.clone(),
                    engine: engine.clone(),
                    batch: b,
                    instances: instances.len(),
                    runs,
                    seconds,
                    cpu_seconds,
                };
                if args.json {
                    println!(
                        "{{\"model\":\"{}\",\"engine\":\"{}\",\"batch\":{},\"threads\":{threads},\"instances\":{},\"runs\":{},\"items_per_s\":{:.2},\"ms_per_batch\":{:.3},\"items_per_cpu_s\":{:.2}}}",
                        p.model,
                        p.engine,
                        p.batch,
                        p.instances,
                        p.runs,
                        p.items_per_s(),
                        p.ms_per_batch(),
                        p.items_per_cpu_s()
                    );
                } else {
                    println!(
                        "{:<12} {:<12} {:>5} {:>8} {:>8} {:>12.1} {:>10.2} {:>12.1}",
                        p.model,
                        p.engine,
                        p.batch,
                        threads,
                        p.runs,
                        p.items_per_s(),
                        p.ms_per_batch(),
                        p.items_per_cpu_s()
                    );
                }
            }
        }
    }
}
