//! The `pytorch` backend: TorchScript modules (`torch.jit.trace` / `torch.jit.script`, saved as
//! `model.pt`) on libtorch through [`tch`], Triton's `platform: "pytorch_libtorch"`.
//!
//! Built only with the `libtorch` feature (the binary's `torch` feature), which needs libtorch
//! 2.13.0 at build time (`LIBTORCH=...`, laid out by `scripts/setup-torch.sh`); without it this
//! crate is empty and the default build needs nothing of PyTorch.
//!
//! - A TorchScript file does not declare its inputs and outputs: config.pbtxt must (as in
//!   Triton). Inputs named `INPUT__<i>` go to `forward` by index `i`; other names go in the
//!   configuration's order. Outputs named `OUTPUT__<i>` are element `i` of a tuple or list
//!   result (or the single tensor for `OUTPUT__0`); other names are keys of a dict result (or
//!   of the one dict in a one-element list result, as detection models answer for one image),
//!   or the single tensor result when only one output is configured.
//! - One module is loaded per version and shared by its instances (libtorch runs a module's
//!   `forward` from several threads at once); each run is under `no_grad`.
//! - Types: BOOL, UINT8, INT8/16/32/64, FP16, BF16, FP32, FP64.
//! - Threads: `parameters { key: "INTRA_OP_THREAD_COUNT" }` / `INTER_OP_THREAD_COUNT` (Triton's
//!   PyTorch backend names) set libtorch's pools, which are per process.

#[cfg(feature = "libtorch")]
mod engine;

#[cfg(feature = "libtorch")]
pub use engine::{NAME, TorchBackend};
