//! `inference.GRPCInferenceService` on top of the engine facade. Each handler decodes, calls
//! the engine once and encodes; every error goes through [`to_status`].

use std::sync::Arc;

use oxserve_core::Error;
use oxserve_engine::InferenceService;
use oxserve_frontend::{DecodeLimits, ModelTarget, decode_off_worker, run};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::convert::{
    decode_work_bytes, index_entry_to_wire, infer_request_from_wire, infer_response_to_wire,
    model_metadata_to_wire, model_statistics_to_wire, parse_version, server_metadata_to_wire,
};
use super::pb::{
    CudaSharedMemoryRegisterRequest, CudaSharedMemoryRegisterResponse, CudaSharedMemoryStatusRequest,
    CudaSharedMemoryStatusResponse, CudaSharedMemoryUnregisterRequest, CudaSharedMemoryUnregisterResponse,
    GrpcInferenceService, GrpcInferenceServiceServer, LogSettingsRequest, LogSettingsResponse,
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ModelRollbackRequest,
    ModelRollbackResponse, ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse,
    ModelVersionLabelSetRequest, ModelVersionLabelSetResponse, ModelVersionLabelsRequest,
    ModelVersionLabelsResponse, RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest,
    RepositoryModelLoadResponse, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, SystemSharedMemoryRegisterRequest, SystemSharedMemoryRegisterResponse,
    SystemSharedMemoryStatusRequest, SystemSharedMemoryStatusResponse, SystemSharedMemoryUnregisterRequest,
    SystemSharedMemoryUnregisterResponse, system_shared_memory_status_response::RegionStatus,
};
use super::status::to_status;
use oxserve_shm::SharedMemoryRegistry;

/// Settings of the gRPC front-end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcOptions {
    /// Largest request or response message, in bytes (tonic's own default is 4 MiB, too small
    /// for image batches). Same default as the HTTP body limit.
    pub max_message_bytes: usize,
    /// Limits applied while decoding infer requests (BYTES elements).
    pub decode: DecodeLimits,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        GrpcOptions {
            max_message_bytes: 64 * 1024 * 1024,
            decode: DecodeLimits::default(),
        }
    }
}

/// The tonic service: the generated server wrapping [`GrpcFrontend`].
pub type GrpcServer = GrpcInferenceServiceServer<GrpcFrontend>;

/// [`grpc_service_with_options`] with the default options and its own shared-memory registry.
pub fn grpc_service(engine: InferenceService) -> GrpcServer {
    grpc_service_with_options(engine, GrpcOptions::default(), Arc::default())
}

/// The gRPC service, ready to be added to a `tonic::transport::Server` (or routed by path
/// `/inference.GRPCInferenceService/*`). `shm` is shared with the HTTP front-end.
pub fn grpc_service_with_options(
    engine: InferenceService,
    options: GrpcOptions,
    shm: Arc<SharedMemoryRegistry>,
) -> GrpcServer {
    GrpcInferenceServiceServer::new(GrpcFrontend {
        engine,
        shm,
        decode: options.decode,
    })
    .max_decoding_message_size(options.max_message_bytes)
    .max_encoding_message_size(options.max_message_bytes)
    // tritonclient can compress requests. Responses stay uncompressed, as in Triton's
    // default: gRPC clients advertise gzip by default, and compressing every tensor
    // would cost more CPU than it saves on the networks models are served on.
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Deflate)
}

/// Implements the generated service trait on the engine facade.
#[derive(Clone)]
pub struct GrpcFrontend {
    engine: InferenceService,
    shm: Arc<SharedMemoryRegistry>,
    decode: DecodeLimits,
}

impl GrpcFrontend {
    pub fn new(engine: InferenceService, shm: Arc<SharedMemoryRegistry>) -> Self {
        GrpcFrontend {
            engine,
            shm,
            decode: DecodeLimits::default(),
        }
    }

    /// The same front-end with other decoding limits (what [`GrpcOptions::decode`] sets).
    pub fn with_decode_limits(self, decode: DecodeLimits) -> Self {
        GrpcFrontend { decode, ..self }
    }
}

/// Requests of one stream in flight at once; later ones wait (back-pressure on the client).
pub const STREAM_CONCURRENCY: usize = 64;

/// The answers of a `ModelStreamInfer` stream.
pub type ModelStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

impl GrpcFrontend {
    /// One request of a stream, run: its response, or its error with an empty response that
    /// names the request (id, model, version), as Triton fills it.
    async fn stream_answer(
        &self,
        request: ModelInferRequest,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<ModelInferResponse, (ModelInferResponse, Error)> {
        let named = ModelInferResponse {
            model_name: request.model_name.clone(),
            model_version: request.model_version.clone(),
            id: request.id.clone(),
            ..Default::default()
        };
        let routing_key = oxserve_frontend::sticky_routing_key(&self.engine, &request.model_name, |name| {
            metadata.get(name).and_then(|v| v.to_str().ok())
        });
        let target = match ModelTarget::resolve_str(&self.engine, &request.model_name, &request.model_version)
        {
            Ok(t) => t,
            Err(e) => return Err((named, e)),
        };
        let trace = grpc_trace(&self.engine, &request.model_name, traceparent(metadata));
        let limits = self.decode;
        let decoded = decode_off_worker(decode_work_bytes(&request), move || {
            infer_request_from_wire(target, request, &limits)
        })
        .await;
        let mut decoded = match decoded {
            Ok(d) => d,
            Err(e) => return Err((named, e)),
        };
        decoded.routing_key = routing_key;
        decoded.trace = trace.clone();
        let answer = match run(&self.engine, &self.shm, decoded).await {
            Ok(response) => Ok(infer_response_to_wire(response)),
            Err(e) => Err((named, e)),
        };
        grpc_trace_sent(trace.as_deref());
        answer
    }
}

/// A trace for a gRPC request when the trace settings sample it. tonic has read and decoded
/// the message before the handler runs, so the read is timed as it ends.
fn grpc_trace(
    engine: &InferenceService,
    model: &str,
    traceparent: Option<&str>,
) -> Option<std::sync::Arc<oxserve_core::Trace>> {
    let trace = engine.trace().sample(model, traceparent)?;
    trace.timestamp("GRPC_WAITREAD_START");
    trace.timestamp("GRPC_WAITREAD_END");
    Some(trace)
}

/// The client's W3C trace context.
fn traceparent(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get("traceparent").and_then(|v| v.to_str().ok())
}

/// The response is complete and handed to tonic, which encodes and writes it after the
/// handler returns: the send is timed as that hand-off.
fn grpc_trace_sent(trace: Option<&oxserve_core::Trace>) {
    if let Some(t) = trace {
        t.timestamp("INFER_RESPONSE_COMPLETE");
        t.timestamp("GRPC_SEND_START");
        t.timestamp("GRPC_SEND_END");
    }
}

fn status(err: Error) -> Status {
    to_status(&err)
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcFrontend {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse {
            live: self.engine.is_live(),
        }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.engine.is_ready(),
        }))
    }

    /// Like Triton: an unknown model or version is `ready: false` with status OK; only a
    /// malformed version string is an error (INVALID_ARGUMENT).
    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let version = oxserve_frontend::version_or_label(&self.engine, &request.name, &request.version)
            .map_err(status)?;
        Ok(Response::new(ModelReadyResponse {
            ready: self.engine.model_ready(&request.name, version),
        }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(server_metadata_to_wire(
            self.engine.server_metadata(),
        )))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let version = oxserve_frontend::version_or_label(&self.engine, &request.name, &request.version)
            .map_err(status)?;
        let metadata = self
            .engine
            .model_metadata(&request.name, version)
            .map_err(status)?;
        Ok(Response::new(model_metadata_to_wire(metadata)))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let routing_key =
            oxserve_frontend::sticky_routing_key(&self.engine, &request.get_ref().model_name, |name| {
                request.metadata().get(name).and_then(|v| v.to_str().ok())
            });
        let traceparent = traceparent(request.metadata()).map(str::to_string);
        let request = request.into_inner();
        // The model first: an unknown one costs no tensor decoding.
        let target = ModelTarget::resolve_str(&self.engine, &request.model_name, &request.model_version)
            .map_err(status)?;
        let trace = grpc_trace(&self.engine, &request.model_name, traceparent.as_deref());
        let limits = self.decode;
        let mut decoded = decode_off_worker(decode_work_bytes(&request), move || {
            infer_request_from_wire(target, request, &limits)
        })
        .await
        .map_err(status)?;
        decoded.routing_key = routing_key;
        decoded.trace = trace.clone();
        let response = run(&self.engine, &self.shm, decoded).await.map_err(status)?;
        let response = infer_response_to_wire(response);
        grpc_trace_sent(trace.as_deref());
        Ok(Response::new(response))
    }

    /// No CUDA shared memory here: no region exists (a named one is NOT_FOUND, as over HTTP).
    async fn cuda_shared_memory_status(
        &self,
        request: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Ok(Response::new(CudaSharedMemoryStatusResponse::default()));
        }
        Err(status(Error::not_found(format!(
            "Unable to find cuda shared memory region: '{name}'"
        ))))
    }

    /// Refused with the reason (UNIMPLEMENTED, as the HTTP endpoint's 501).
    async fn cuda_shared_memory_register(
        &self,
        request: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        let name = request.into_inner().name;
        Err(status(Error::unsupported(format!(
            "cannot register CUDA shared memory region '{name}': this server has no CUDA shared memory support"
        ))))
    }

    /// Nothing to unregister: succeeds, as over HTTP.
    async fn cuda_shared_memory_unregister(
        &self,
        _request: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        Ok(Response::new(CudaSharedMemoryUnregisterResponse {}))
    }

    /// Triton's trace extension over gRPC: an empty settings map reads, a setting without
    /// values goes back to the inherited value.
    async fn trace_setting(
        &self,
        request: Request<super::pb::TraceSettingRequest>,
    ) -> Result<Response<super::pb::TraceSettingResponse>, Status> {
        use super::pb::trace_setting_response::SettingValue;
        use oxserve_engine::trace::settings::{Protocol, SettingValue as Value};
        let request = request.into_inner();
        let model = (!request.model_name.is_empty()).then_some(request.model_name.as_str());
        let update: Vec<(String, Value)> = request
            .settings
            .into_iter()
            .map(|(key, v)| {
                let value = if v.value.is_empty() {
                    Value::Clear
                } else {
                    Value::Values(v.value)
                };
                (key, value)
            })
            .collect();
        let settings = crate::trace::trace_setting(
            &self.engine,
            model,
            (!update.is_empty()).then_some((update.as_slice(), Protocol::Grpc)),
        )
        .map_err(status)?;
        Ok(Response::new(super::pb::TraceSettingResponse {
            settings: settings
                .into_iter()
                .map(|(key, value)| (key, SettingValue { value }))
                .collect(),
        }))
    }

    /// Triton's logging extension over gRPC: the settings named in the request change (typed
    /// as Triton types them), and every setting is answered.
    async fn log_settings(
        &self,
        request: Request<LogSettingsRequest>,
    ) -> Result<Response<LogSettingsResponse>, Status> {
        use super::pb::log_settings_request::setting_value::ParameterChoice as In;
        use super::pb::log_settings_response::SettingValue;
        use super::pb::log_settings_response::setting_value::ParameterChoice as Out;
        let mut update = crate::logging::LogUpdate::default();
        for (key, value) in request.into_inner().settings {
            let value = value.parameter_choice;
            let wrong = |want: &str| status(Error::invalid(format!("'{key}' must be a {want}")));
            match key.as_str() {
                "log_file" => match value {
                    Some(In::StringParam(s)) => update.log_file = Some(s),
                    None => {}
                    _ => return Err(wrong("string")),
                },
                "log_info" | "log_warning" | "log_error" => {
                    let flag = match value {
                        Some(In::BoolParam(b)) => Some(b),
                        None => None,
                        _ => return Err(wrong("bool")),
                    };
                    match key.as_str() {
                        "log_info" => update.log_info = flag,
                        "log_warning" => update.log_warning = flag,
                        _ => update.log_error = flag,
                    }
                }
                "log_verbose_level" => match value {
                    Some(In::Uint32Param(n)) => update.log_verbose_level = Some(n),
                    None => {}
                    _ => return Err(wrong("uint32")),
                },
                "log_format" => match value {
                    Some(In::StringParam(s)) => update.log_format = Some(s),
                    None => {}
                    _ => return Err(wrong("string")),
                },
                other => return Err(status(Error::invalid(format!("unknown log setting '{other}'")))),
            }
        }
        let s = crate::logging::update(&update).map_err(status)?;
        let value = |v: Out| SettingValue {
            parameter_choice: Some(v),
        };
        let settings = [
            ("log_file", value(Out::StringParam(s.log_file))),
            ("log_info", value(Out::BoolParam(s.log_info))),
            ("log_warning", value(Out::BoolParam(s.log_warning))),
            ("log_error", value(Out::BoolParam(s.log_error))),
            ("log_verbose_level", value(Out::Uint32Param(s.log_verbose_level))),
            ("log_format", value(Out::StringParam(s.log_format))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(Response::new(LogSettingsResponse { settings }))
    }

    type ModelStreamInferStream = ModelStream;

    /// Triton's streaming inference: every request on the stream is decoded and run as
    /// `ModelInfer` would run it, up to [`STREAM_CONCURRENCY`] at a time (so the dynamic
    /// batcher sees them together), and answered in the order the requests came. A failed
    /// request is answered with `error_message` (and its id) and the stream goes on. When the
    /// client goes away the stream is dropped, and with it the requests still running.
    async fn model_stream_infer(
        &self,
        request: Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        use futures::StreamExt;
        let metadata = request.metadata().clone();
        // Triton's `triton_grpc_error: true` header: the first failed request ends the stream
        // with its gRPC status instead of an error_message.
        let end_on_error = metadata
            .get("triton_grpc_error")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let incoming = request.into_inner();
        let frontend = self.clone();
        // The server's in-flight budget charges the stream's frames as they arrive; each
        // message's share goes back once it is answered, so a long stream holds only what is
        // in flight.
        let charge = crate::http::current_body_charge();
        let answers = incoming
            .map(move |message| {
                let frontend = frontend.clone();
                let metadata = metadata.clone();
                let charge = charge.clone();
                async move {
                    // A message that is not a ModelInferRequest ends the stream with its status.
                    let request = message?;
                    // Its frame on the wire: 5 bytes of gRPC framing and the message.
                    let wire_bytes = prost::Message::encoded_len(&request) + 5;
                    let answer = frontend.stream_answer(request, &metadata).await;
                    if let Some(charge) = &charge {
                        charge.release_message(wire_bytes);
                    }
                    match answer {
                        Ok(response) => Ok(ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        }),
                        Err((_, e)) if end_on_error => Err(status(e)),
                        Err((named, e)) => Ok(ModelStreamInferResponse {
                            error_message: e.message().to_string(),
                            infer_response: Some(named),
                        }),
                    }
                }
            })
            .buffered(STREAM_CONCURRENCY);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let version = oxserve_frontend::version_or_label(&self.engine, &request.name, &request.version)
            .map_err(status)?;
        let config = self.engine.model_config(&request.name, version).map_err(status)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some((*config).clone()),
        }))
    }

    /// Triton's statistics extension: no name = every ready version of every model; a name
    /// without a version = every ready version of that model; unknown model or version →
    /// NOT_FOUND.
    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let version = oxserve_frontend::version_or_label(&self.engine, &request.name, &request.version)
            .map_err(status)?;
        // As in Triton, a version without a model name is ignored: all models are listed.
        let (name, version) = if request.name.is_empty() {
            (None, None)
        } else {
            (Some(request.name.as_str()), version)
        };
        let model_stats = self
            .engine
            .model_statistics(name, version)
            .map_err(status)?
            .into_iter()
            .map(model_statistics_to_wire)
            .collect();
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let request = request.into_inner();
        if !request.repository_name.is_empty() {
            // Triton answers the same (UNSUPPORTED → UNIMPLEMENTED).
            return Err(status(Error::unsupported(
                "'repository_name' specification is not supported",
            )));
        }
        let models = self
            .engine
            .repository_index(request.ready)
            .into_iter()
            .map(index_entry_to_wire)
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let request = request.into_inner();
        check_repository_name(&request.repository_name)?;
        let overrides =
            crate::repository::load_override(&request.model_name, repository_parameters(request.parameters))
                .map_err(status)?;
        self.engine
            .load_model(&request.model_name, overrides)
            .await
            .map_err(status)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let request = request.into_inner();
        check_repository_name(&request.repository_name)?;
        let parameters = repository_parameters(request.parameters);
        crate::repository::check_unload_parameters(&request.model_name, &parameters).map_err(status)?;
        self.engine
            .unload_model(&request.model_name)
            .await
            .map_err(status)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn model_version_labels(
        &self,
        request: Request<ModelVersionLabelsRequest>,
    ) -> Result<Response<ModelVersionLabelsResponse>, Status> {
        let (labels, default) = self
            .engine
            .version_labels(&request.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(ModelVersionLabelsResponse {
            labels: labels.into_iter().map(|(l, v)| (l, v.to_string())).collect(),
            default_version: default.map(|v| v.to_string()).unwrap_or_default(),
        }))
    }

    async fn model_version_label_set(
        &self,
        request: Request<ModelVersionLabelSetRequest>,
    ) -> Result<Response<ModelVersionLabelSetResponse>, Status> {
        let request = request.into_inner();
        let version = parse_version(&request.version)
            .map_err(status)?
            .ok_or_else(|| status(Error::invalid("the label request needs a version")))?;
        self.engine
            .set_version_label(&request.name, &request.label, version)
            .map_err(status)?;
        Ok(Response::new(ModelVersionLabelSetResponse {}))
    }

    async fn model_rollback(
        &self,
        request: Request<ModelRollbackRequest>,
    ) -> Result<Response<ModelRollbackResponse>, Status> {
        let request = request.into_inner();
        let label = (!request.label.is_empty()).then_some(request.label.as_str());
        let version = self.engine.rollback(&request.name, label).map_err(status)?;
        Ok(Response::new(ModelRollbackResponse {
            version: version.to_string(),
        }))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        let name = request.into_inner().name;
        let regions = self
            .shm
            .status((!name.is_empty()).then_some(name.as_str()))
            .map_err(status)?
            .into_iter()
            .map(|r| {
                let status = RegionStatus {
                    name: r.name.clone(),
                    key: r.key,
                    offset: r.offset,
                    byte_size: r.byte_size,
                };
                (r.name, status)
            })
            .collect();
        Ok(Response::new(SystemSharedMemoryStatusResponse { regions }))
    }

    /// Admitted by the client's address (`oxserve_shm::admit_registration`); a transport that
    /// does not report it counts as remote (fail closed).
    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        let peer = request.remote_addr().map(|addr| addr.ip());
        let r = request.into_inner();
        self.shm
            .register(peer, &r.name, &r.key, r.offset, r.byte_size)
            .map_err(status)?;
        Ok(Response::new(SystemSharedMemoryRegisterResponse {}))
    }

    /// An empty name unregisters every region; an unknown name is not an error (Triton).
    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            self.shm.unregister_all();
        } else {
            self.shm.unregister(&name);
        }
        Ok(Response::new(SystemSharedMemoryUnregisterResponse {}))
    }
}

/// A named repository: Triton answers the same (UNSUPPORTED → UNIMPLEMENTED).
fn check_repository_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        Ok(())
    } else {
        Err(status(Error::unsupported(
            "'repository_name' specification is not supported",
        )))
    }
}

/// The wire's parameters in the form both protocols share (an unset one is refused as a
/// parameter of the wrong type).
fn repository_parameters(
    parameters: std::collections::HashMap<String, super::pb::ModelRepositoryParameter>,
) -> Vec<(String, crate::repository::RepositoryParameter)> {
    use super::pb::model_repository_parameter::ParameterChoice;
    use crate::repository::RepositoryParameter;
    let mut parameters: Vec<_> = parameters
        .into_iter()
        .map(|(key, p)| {
            let value = match p.parameter_choice {
                Some(ParameterChoice::BoolParam(b)) => RepositoryParameter::Bool(b),
                Some(ParameterChoice::Int64Param(i)) => RepositoryParameter::Int(i),
                Some(ParameterChoice::StringParam(s)) => RepositoryParameter::Text(s),
                Some(ParameterChoice::BytesParam(b)) => RepositoryParameter::Bytes(b),
                None => RepositoryParameter::Unset,
            };
            (key, value)
        })
        .collect();
    // Map order is random; errors name the first bad parameter by name order.
    parameters.sort_by(|a, b| a.0.cmp(&b.0));
    parameters
}
