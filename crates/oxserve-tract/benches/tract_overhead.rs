//! What the backend adds on top of raw tract: `execute` (checks, byte conversions, output
//! hand-over) against `SimpleState::run` on the same optimised model, side by side in one run.
//!
//! `cargo bench -p oxserve-tract --bench tract_overhead`

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use oxserve_backend::{Backend, Batch};
use oxserve_core::DataType;
use oxserve_tract::TractBackend;
use tract_onnx::prelude::*;

const WIDTH: usize = 256;

fn main() {
    let dir = tempfile::TempDir::new().unwrap();
    let m = model(
        vec![
            node("Add", &["a", "b"], &["sum"]),
            node("Sub", &["a", "b"], &["diff"]),
        ],
        vec![
            value("a", OnnxType::Float, Some(&[D::P("N"), D::V(WIDTH as i64)])),
            value("b", OnnxType::Float, Some(&[D::P("N"), D::V(WIDTH as i64)])),
        ],
        vec![
            value("sum", OnnxType::Float, Some(&[D::P("N"), D::V(WIDTH as i64)])),
            value("diff", OnnxType::Float, Some(&[D::P("N"), D::V(WIDTH as i64)])),
        ],
        vec![],
    );
    let path = write(dir.path(), "model.onnx", &m);
    let w = WIDTH as i64;
    let spec = spec(
        &path,
        vec![
            meta("a", DataType::F32, &[-1, w]),
            meta("b", DataType::F32, &[-1, w]),
        ],
        vec![
            meta("sum", DataType::F32, &[-1, w]),
            meta("diff", DataType::F32, &[-1, w]),
        ],
        64,
    );

    let loads = 20;
    let t = Instant::now();
    for _ in 0..loads {
        TractBackend.load(&spec).unwrap();
    }
    let load_ms = t.elapsed().as_secs_f64() * 1e3 / loads as f64;

    let mut inst = TractBackend.load(&spec).unwrap().new_instance(0).unwrap();

    let raw_model = tract_onnx::onnx().model_for_path(&path).unwrap();
    let n = raw_model.sym("N");
    let fact = f32::fact(&[n.to_dim(), WIDTH.to_dim()]);
    let plan = raw_model
        .with_input_fact(0, fact.clone().into())
        .unwrap()
        .with_input_fact(1, fact.into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let mut state = plan.spawn().unwrap();

    println!("tract_overhead: a+b and a-b over [N, {WIDTH}] f32, single thread");
    println!("model load + optimise: {load_ms:.2} ms");
    println!(
        "{:>6} {:>14} {:>14} {:>8}",
        "batch", "raw tract µs", "execute µs", "ratio"
    );
    for batch in [1usize, 8, 64] {
        let len = batch * WIDTH;
        let a: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
        let shape = [batch as i64, w];
        let ta = f32_tensor("a", &shape, &a);
        let tb = f32_tensor("b", &shape, &b);
        let xa = tract_ndarray::Array2::from_shape_vec((batch, WIDTH), a).unwrap();
        let xb = tract_ndarray::Array2::from_shape_vec((batch, WIDTH), b).unwrap();
        let iters = 200_000 / batch;
        let (mut raw, mut ours) = (Duration::ZERO, Duration::ZERO);
        // Interleave rounds so both sides see the same machine noise.
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..iters / 5 {
                // Raw tract also builds its input tensors from request-like buffers.
                let inputs = tvec!(Tensor::from(xa.clone()).into(), Tensor::from(xb.clone()).into());
                std::hint::black_box(state.run(inputs).unwrap());
            }
            raw += t.elapsed();
            let t = Instant::now();
            for _ in 0..iters / 5 {
                let out = inst
                    .execute(Batch {
                        inputs: vec![ta.clone(), tb.clone()],
                        outputs: vec!["sum".into(), "diff".into()],
                    })
                    .unwrap();
                std::hint::black_box(out);
            }
            ours += t.elapsed();
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / (iters / 5 * 5) as f64;
        println!(
            "{:>6} {:>14.2} {:>14.2} {:>8.2}",
            batch,
            per(raw),
            per(ours),
            per(ours) / per(raw)
        );
    }
}
