//! Triton's ensembles (`platform: "ensemble"`, `ensemble_scheduling { step [...] }`): a request
//! to the ensemble runs its steps — other models of the same server — passing tensors by the
//! ensemble's names (`input_map`: step input → ensemble tensor, `output_map`: step output →
//! ensemble tensor). A step runs as soon as all the tensors it reads exist, so independent
//! steps run at once; each step is an ordinary request to its model (its own scheduler,
//! batcher, instances and statistics). A step's failure fails the request, naming the step.
//!
//! The ensemble is an engine like the others: the engine's scheduler hands it batches and its
//! instances wait on the steps. It needs the engine it belongs to, given once the engine
//! exists ([`EnsembleBackend::attach`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use futures::future::join_all;
use oxserve_backend::{
    Backend, BackendError, BackendErrorKind, Batch, LoadSpec, LoadedModel, ModelInstance, ModelSignature,
};
use oxserve_core::{InferRequest, RequestedOutput, Tensor};
use oxserve_engine::{ENSEMBLE, ENSEMBLE_STEPS_PARAMETER, InferenceService};
use serde::Deserialize;

/// One step, as the engine passes it (`ensemble_steps`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Step {
    pub model_name: String,
    /// -1: the latest version.
    pub model_version: i64,
    /// Step input → ensemble tensor.
    pub input_map: BTreeMap<String, String>,
    /// Step output → ensemble tensor.
    pub output_map: BTreeMap<String, String>,
}

/// Where an ensemble's steps run: the engine, and a runtime to wait on it from the
/// scheduler's instance threads.
struct Attached {
    engine: InferenceService,
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
pub struct EnsembleBackend {
    attached: Arc<OnceLock<Attached>>,
}

impl EnsembleBackend {
    pub fn new() -> Self {
        EnsembleBackend::default()
    }

    /// Gives the ensembles the engine they belong to (once it exists) and the runtime its
    /// futures run on.
    pub fn attach(&self, engine: InferenceService, runtime: tokio::runtime::Handle) {
        let _ = self.attached.set(Attached { engine, runtime });
    }
}

impl Backend for EnsembleBackend {
    fn name(&self) -> &'static str {
        ENSEMBLE
    }

    fn inspect(&self, _model_path: &Path) -> Result<ModelSignature, BackendError> {
        Ok(ModelSignature::default())
    }

    fn declares_signature(&self) -> bool {
        false
    }

    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        let steps: Vec<Step> = spec
            .parameters
            .get(ENSEMBLE_STEPS_PARAMETER)
            .ok_or_else(|| BackendError::new(BackendErrorKind::InvalidModel, "the ensemble has no steps"))
            .and_then(|json| {
                serde_json::from_str(json).map_err(|e| {
                    BackendError::new(
                        BackendErrorKind::InvalidModel,
                        format!("invalid ensemble steps: {e}"),
                    )
                })
            })?;
        Ok(Box::new(Ensemble(Arc::new(Pipeline {
            name: spec.model_name.clone(),
            inputs: spec.inputs.iter().map(|i| i.name.clone()).collect(),
            steps,
            attached: self.attached.clone(),
        }))))
    }
}

struct Pipeline {
    name: String,
    /// The ensemble's input names, in the order batches carry them.
    inputs: Vec<String>,
    steps: Vec<Step>,
    attached: Arc<OnceLock<Attached>>,
}

struct Ensemble(Arc<Pipeline>);

impl LoadedModel for Ensemble {
    fn new_instance(&self, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Ok(Box::new(Ensemble(self.0.clone())))
    }
}

impl ModelInstance for Ensemble {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        let attached = self.0.attached.get().ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Internal,
                "ensembles are not attached to an engine",
            )
        })?;
        // The scheduler's instance threads are not the runtime's: waiting here is allowed.
        attached.runtime.block_on(self.0.run(&attached.engine, batch))
    }
}

impl Pipeline {
    async fn run(&self, engine: &InferenceService, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        let mut tensors: HashMap<String, Tensor> = self.inputs.iter().cloned().zip(batch.inputs).collect();
        let mut done = vec![false; self.steps.len()];
        while done.iter().any(|d| !d) {
            let ready: Vec<usize> = (0..self.steps.len())
                .filter(|&i| !done[i] && self.steps[i].input_map.values().all(|t| tensors.contains_key(t)))
                .collect();
            if ready.is_empty() {
                return Err(BackendError::new(
                    BackendErrorKind::Internal,
                    format!(
                        "ensemble '{}': no step can run (its inputs are never produced)",
                        self.name
                    ),
                ));
            }
            let runs = ready.iter().map(|&i| self.run_step(engine, i, &tensors));
            for (i, produced) in ready.iter().zip(join_all(runs).await) {
                done[*i] = true;
                tensors.extend(produced?);
            }
        }
        batch
            .outputs
            .iter()
            .map(|name| {
                tensors.remove(name).map(|mut t| {
                    t.name.clone_from(name);
                    t
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Internal,
                    format!("ensemble '{}': an output was not produced", self.name),
                )
            })
    }

    /// Runs step `i` on the tensors it reads; answers what it produced, by ensemble names.
    async fn run_step(
        &self,
        engine: &InferenceService,
        i: usize,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Vec<(String, Tensor)>, BackendError> {
        let step = &self.steps[i];
        let inputs = step
            .input_map
            .iter()
            .filter_map(|(model_input, tensor)| {
                tensors.get(tensor).map(|t| {
                    let mut t = t.clone();
                    t.name.clone_from(model_input);
                    t
                })
            })
            .collect();
        let request = InferRequest {
            model_name: step.model_name.clone(),
            model_version: u64::try_from(step.model_version).ok(),
            inputs,
            outputs: step.output_map.keys().map(RequestedOutput::new).collect(),
            ..Default::default()
        };
        let response = engine.infer(request).await.map_err(|e| {
            let kind = match e.kind() {
                oxserve_core::ErrorKind::InvalidArgument => BackendErrorKind::InvalidInput,
                _ => BackendErrorKind::Internal,
            };
            BackendError::new(
                kind,
                format!(
                    "ensemble '{}' step {i} (model '{}'): {}",
                    self.name,
                    step.model_name,
                    e.message()
                ),
            )
        })?;
        Ok(response
            .outputs
            .into_iter()
            .filter_map(|t| step.output_map.get(&t.name).map(|name| (name.clone(), t)))
            .collect())
    }
}
