//! TF Serving's gRPC API: `tensorflow.serving.PredictionService` (Predict, Classify, Regress,
//! MultiInference, GetModelMetadata) and `tensorflow.serving.ModelService` (GetModelStatus,
//! HandleReloadConfigRequest), over the same engine and request runner as every protocol.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use oxserve_core::{Error, Result};
use oxserve_engine::InferenceService;
use oxserve_shm::SharedMemoryRegistry;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::config::ServingDefaults;
use crate::error::grpc_status;
use crate::examples::with_context;
use crate::pb::tensorflow::serving as pb;
use crate::pb::tensorflow::serving::model_service_server::{ModelService, ModelServiceServer};
use crate::pb::tensorflow::serving::prediction_service_server::{PredictionService, PredictionServiceServer};
use crate::spec::{self, CLASSIFY_METHOD, ModelRef, REGRESS_METHOD, VersionChoice};

/// Settings of the TF Serving gRPC services.
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// The largest message accepted (and the most a value list may expand to).
    pub max_message_bytes: usize,
    /// How models of a reloaded model server config are served (TF Serving's flags).
    pub defaults: ServingDefaults,
    /// Relative `base_path`s of a reloaded config are taken from here.
    pub base_dir: PathBuf,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        GrpcOptions {
            max_message_bytes: 64 << 20,
            defaults: ServingDefaults {
                instances: std::thread::available_parallelism().map_or(2, |n| n.get()),
                ..Default::default()
            },
            base_dir: PathBuf::from("/"),
        }
    }
}

#[derive(Clone)]
struct Services {
    engine: InferenceService,
    shm: Arc<SharedMemoryRegistry>,
    options: Arc<GrpcOptions>,
}

/// Both services, ready to add to a tonic server.
pub fn services(
    engine: InferenceService,
    options: GrpcOptions,
) -> (
    PredictionServiceServer<impl PredictionService>,
    ModelServiceServer<impl ModelService>,
) {
    let max = options.max_message_bytes;
    let s = Services {
        engine,
        shm: Arc::new(SharedMemoryRegistry::disabled()),
        options: Arc::new(options),
    };
    (
        PredictionServiceServer::new(s.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Deflate),
        ModelServiceServer::new(s)
            .max_decoding_message_size(max)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Deflate),
    )
}

fn model_ref(spec: Option<&pb::ModelSpec>) -> Result<(ModelRef, String)> {
    let Some(spec) = spec else {
        return Err(Error::invalid("Missing ModelSpec"));
    };
    if spec.name.is_empty() {
        return Err(Error::invalid("ModelSpec has no name specified."));
    }
    let version = match &spec.version_choice {
        None => VersionChoice::Latest,
        // Any number is a version to look for; a negative one is never found.
        Some(pb::model_spec::VersionChoice::Version(v)) => match u64::try_from(*v) {
            Ok(v) => VersionChoice::Specific(v),
            Err(_) => {
                return Err(Error::not_found(format!(
                    "Servable not found for request: Specific({}, {v})",
                    spec.name
                )));
            }
        },
        Some(pb::model_spec::VersionChoice::VersionLabel(l)) => VersionChoice::Label(l.clone()),
    };
    Ok((
        ModelRef {
            name: spec.name.clone(),
            version,
        },
        spec.signature_name.clone(),
    ))
}

fn answered_spec(name: &str, version: u64, signature: &str) -> pb::ModelSpec {
    pb::ModelSpec {
        name: name.to_string(),
        signature_name: signature.to_string(),
        version_choice: Some(pb::model_spec::VersionChoice::Version(version as i64)),
    }
}

/// The serialized examples of an `Input` (each with the context merged in).
fn examples_of(input: Option<pb::Input>) -> Result<Vec<Bytes>> {
    let kind = input
        .and_then(|i| i.kind)
        .ok_or_else(|| Error::invalid("Input is empty."))?;
    let examples = match kind {
        pb::input::Kind::ExampleList(list) => list
            .examples
            .iter()
            .map(|e| Bytes::from(e.encode_to_vec()))
            .collect::<Vec<_>>(),
        pb::input::Kind::ExampleListWithContext(list) => {
            let context = list.context.as_ref().map(Message::encode_to_vec);
            list.examples
                .iter()
                .map(|e| with_context(context.as_deref(), &e.encode_to_vec()))
                .collect()
        }
    };
    if examples.is_empty() {
        return Err(Error::invalid("Input is empty."));
    }
    Ok(examples)
}

impl Services {
    async fn predict_inner(&self, request: pb::PredictRequest) -> Result<pb::PredictResponse> {
        let (model, signature_name) = model_ref(request.model_spec.as_ref())?;
        let target = model.resolve(&self.engine)?;
        let metadata = self.engine.model_metadata(target.name(), target.version())?;
        let sig = spec::signature(&metadata, &signature_name)?;
        let max = self.options.max_message_bytes;
        let inputs = request
            .inputs
            .into_iter()
            .map(|(key, proto)| crate::tensor_proto::to_tensor(&key, proto, max))
            .collect::<Result<Vec<_>>>()?;
        let predicted = crate::run::predict(
            &self.engine,
            &self.shm,
            target,
            &metadata.inputs,
            &sig,
            inputs,
            &request.output_filter,
        )
        .await?;
        Ok(pb::PredictResponse {
            model_spec: Some(answered_spec(&model.name, predicted.version, &sig.name)),
            outputs: predicted
                .outputs
                .into_iter()
                .map(|t| (t.name.clone(), crate::tensor_proto::from_tensor(t)))
                .collect(),
        })
    }

    async fn classify_inner(
        &self,
        spec_in: Option<&pb::ModelSpec>,
        input: Option<pb::Input>,
    ) -> Result<pb::ClassificationResponse> {
        let (model, signature_name) = model_ref(spec_in)?;
        let target = model.resolve(&self.engine)?;
        let metadata = self.engine.model_metadata(target.name(), target.version())?;
        let sig = spec::signature(&metadata, &signature_name)?;
        let examples = examples_of(input)?;
        let (version, results) =
            crate::run::classify(&self.engine, &self.shm, target, &metadata.inputs, &sig, examples).await?;
        Ok(pb::ClassificationResponse {
            model_spec: Some(answered_spec(&model.name, version, &sig.name)),
            result: Some(pb::ClassificationResult {
                classifications: results
                    .into_iter()
                    .map(|classes| pb::Classifications {
                        classes: classes
                            .into_iter()
                            .map(|(label, score)| pb::Class {
                                label: String::from_utf8_lossy(&label).into_owned(),
                                score,
                            })
                            .collect(),
                    })
                    .collect(),
            }),
        })
    }

    async fn regress_inner(
        &self,
        spec_in: Option<&pb::ModelSpec>,
        input: Option<pb::Input>,
    ) -> Result<pb::RegressionResponse> {
        let (model, signature_name) = model_ref(spec_in)?;
        let target = model.resolve(&self.engine)?;
        let metadata = self.engine.model_metadata(target.name(), target.version())?;
        let sig = spec::signature(&metadata, &signature_name)?;
        let examples = examples_of(input)?;
        let (version, values) =
            crate::run::regress(&self.engine, &self.shm, target, &metadata.inputs, &sig, examples).await?;
        Ok(pb::RegressionResponse {
            model_spec: Some(answered_spec(&model.name, version, &sig.name)),
            result: Some(pb::RegressionResult {
                regressions: values.into_iter().map(|value| pb::Regression { value }).collect(),
            }),
        })
    }

    /// TF Serving's MultiInference: classify and regress tasks on one model and version, over
    /// the same examples.
    async fn multi_inference_inner(
        &self,
        request: pb::MultiInferenceRequest,
    ) -> Result<pb::MultiInferenceResponse> {
        if request.tasks.is_empty() {
            return Err(Error::invalid("Tasks field is empty"));
        }
        let first = request.tasks[0].model_spec.clone().unwrap_or_default();
        let mut signatures = std::collections::HashSet::new();
        for task in &request.tasks {
            let spec = task.model_spec.clone().unwrap_or_default();
            if spec.name != first.name {
                return Err(Error::invalid(
                    "All ModelSpecs in a MultiInferenceRequest must access the same model name.",
                ));
            }
            if spec.version_choice != first.version_choice {
                return Err(Error::invalid(
                    "ModelSpec version_choice must be the same for all tasks of a MultiInferenceRequest.",
                ));
            }
            let signature = if spec.signature_name.is_empty() {
                spec::DEFAULT_SIGNATURE.to_string()
            } else {
                spec.signature_name.clone()
            };
            if !signatures.insert(signature.clone()) {
                return Err(Error::invalid(format!(
                    "Duplicate evaluation of signature: {signature}"
                )));
            }
        }
        let mut results = Vec::with_capacity(request.tasks.len());
        for task in &request.tasks {
            let result = match task.method_name.as_str() {
                CLASSIFY_METHOD => {
                    let r = self
                        .classify_inner(task.model_spec.as_ref(), request.input.clone())
                        .await?;
                    pb::InferenceResult {
                        model_spec: r.model_spec,
                        result: r.result.map(pb::inference_result::Result::ClassificationResult),
                    }
                }
                REGRESS_METHOD => {
                    let r = self
                        .regress_inner(task.model_spec.as_ref(), request.input.clone())
                        .await?;
                    pb::InferenceResult {
                        model_spec: r.model_spec,
                        result: r.result.map(pb::inference_result::Result::RegressionResult),
                    }
                }
                other => {
                    return Err(Error::unsupported(format!(
                        "Unsupported signature method_name: {other}"
                    )));
                }
            };
            results.push(result);
        }
        Ok(pb::MultiInferenceResponse { results })
    }

    fn metadata_inner(&self, request: &pb::GetModelMetadataRequest) -> Result<pb::GetModelMetadataResponse> {
        let (model, _) = model_ref(request.model_spec.as_ref())?;
        if request.metadata_field.is_empty() {
            return Err(Error::invalid(
                "GetModelMetadataRequest must specify at least one metadata_field",
            ));
        }
        if let Some(field) = request.metadata_field.iter().find(|f| *f != "signature_def") {
            return Err(Error::invalid(format!("Metadata field {field} is not supported")));
        }
        let target = model.resolve(&self.engine)?;
        let metadata = self.engine.model_metadata(target.name(), target.version())?;
        let version = match target.version() {
            Some(v) => v,
            None => metadata
                .versions
                .iter()
                .filter_map(|v| v.parse().ok())
                .max()
                .unwrap_or(0),
        };
        let map = pb::SignatureDefMap {
            signature_def: spec::signatures(&metadata)
                .iter()
                .map(|s| (s.name.clone(), crate::describe::signature_def(s)))
                .collect(),
        };
        Ok(pb::GetModelMetadataResponse {
            model_spec: Some(answered_spec(&model.name, version, "")),
            metadata: [(
                "signature_def".to_string(),
                prost_types::Any {
                    type_url: "type.googleapis.com/tensorflow.serving.SignatureDefMap".into(),
                    value: map.encode_to_vec(),
                },
            )]
            .into_iter()
            .collect(),
        })
    }
}

fn answer<T>(result: Result<T>) -> std::result::Result<Response<T>, Status> {
    result.map(Response::new).map_err(|e| grpc_status(&e))
}

#[tonic::async_trait]
impl PredictionService for Services {
    async fn classify(
        &self,
        request: Request<pb::ClassificationRequest>,
    ) -> std::result::Result<Response<pb::ClassificationResponse>, Status> {
        let r = request.into_inner();
        answer(self.classify_inner(r.model_spec.as_ref(), r.input).await)
    }

    async fn regress(
        &self,
        request: Request<pb::RegressionRequest>,
    ) -> std::result::Result<Response<pb::RegressionResponse>, Status> {
        let r = request.into_inner();
        answer(self.regress_inner(r.model_spec.as_ref(), r.input).await)
    }

    async fn predict(
        &self,
        request: Request<pb::PredictRequest>,
    ) -> std::result::Result<Response<pb::PredictResponse>, Status> {
        answer(self.predict_inner(request.into_inner()).await)
    }

    async fn multi_inference(
        &self,
        request: Request<pb::MultiInferenceRequest>,
    ) -> std::result::Result<Response<pb::MultiInferenceResponse>, Status> {
        answer(self.multi_inference_inner(request.into_inner()).await)
    }

    async fn get_model_metadata(
        &self,
        request: Request<pb::GetModelMetadataRequest>,
    ) -> std::result::Result<Response<pb::GetModelMetadataResponse>, Status> {
        answer(self.metadata_inner(request.get_ref()))
    }
}

#[tonic::async_trait]
impl ModelService for Services {
    async fn get_model_status(
        &self,
        request: Request<pb::GetModelStatusRequest>,
    ) -> std::result::Result<Response<pb::GetModelStatusResponse>, Status> {
        let result = model_ref(request.get_ref().model_spec.as_ref()).and_then(|(model, _)| {
            crate::describe::model_status(&self.engine, &model.name, &model.version)
                .map(|model_version_status| pb::GetModelStatusResponse { model_version_status })
        });
        answer(result)
    }

    /// Replaces the served models with the config's list, as TF Serving does: new models load,
    /// removed ones unload after their requests, changed ones reload.
    async fn handle_reload_config_request(
        &self,
        request: Request<pb::ReloadConfigRequest>,
    ) -> std::result::Result<Response<pb::ReloadConfigResponse>, Status> {
        let config = request.into_inner().config.unwrap_or_default();
        if !matches!(
            config.config,
            Some(pb::model_server_config::Config::ModelConfigList(_))
        ) {
            return Err(grpc_status(&Error::invalid(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. Only ModelConfigList is currently supported",
            )));
        }
        let list = crate::config::model_list(&config, &self.options.defaults, &self.options.base_dir)
            .map_err(|e| grpc_status(&Error::invalid(e)))?;
        // As TF Serving: models that did not become available fail the call.
        match self.engine.set_model_list(list).await {
            Ok(()) => Ok(Response::new(pb::ReloadConfigResponse {
                status: Some(pb::StatusProto::default()),
                metric: Vec::new(),
            })),
            Err(e) => Err(tonic::Status::unknown(e.message().to_string())),
        }
    }
}
