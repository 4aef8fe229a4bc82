//! TorchServe's gRPC APIs: `InferenceAPIsService` (Ping, Predictions, StreamPredictions,
//! StreamPredictions2; beside KServe v2 and TF Serving on the gRPC port, 7070) and
//! `ManagementAPIsService` (on `grpc_management_port`, 7071). They run the same code as the
//! HTTP APIs: a management call answers the HTTP API's JSON in `msg`; a prediction takes the
//! request's `input` map as TorchServe's frontend does (each entry an input of the handler; the
//! native image_classifier reads `data`, else `body`, else the first); errors are gRPC statuses
//! carrying TorchServe's message.

use std::pin::Pin;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response as HttpResponse;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};

use crate::api::{self, Ctx, ListQuery, RegisterQuery, ScaleQuery, TsError};
use crate::registry::TorchServe;
use crate::worker::protocol::{Input, Reply, encode_request};

/// Messages, servers and clients generated from `proto/torchserve`, in their packages' module
/// nesting (the generated code reaches `google.rpc` through it).
pub mod pb {
    // Generated code: its style is not ours to lint.
    #![allow(clippy::all, missing_docs)]
    pub mod org {
        pub mod pytorch {
            pub mod serve {
                pub mod grpc {
                    pub mod inference {
                        tonic::include_proto!("org.pytorch.serve.grpc.inference");
                    }
                    pub mod management {
                        tonic::include_proto!("org.pytorch.serve.grpc.management");
                    }
                }
            }
        }
    }
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
    pub use org::pytorch::serve::grpc::{inference, management};
}

use pb::inference::inference_ap_is_service_server::{InferenceApIsService, InferenceApIsServiceServer};
use pb::inference::{PredictionResponse, PredictionsRequest, TorchServeHealthResponse};
use pb::management::management_ap_is_service_server::{ManagementApIsService, ManagementApIsServiceServer};
use pb::management::{
    DescribeModelRequest, ListModelsRequest, ManagementResponse, RegisterModelRequest, ScaleWorkerRequest,
    SetDefaultRequest, UnregisterModelRequest,
};

/// Adds the inference service to the gRPC listener's routes.
pub fn add_inference_service(
    routes: tonic::service::Routes,
    ts: Arc<TorchServe>,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    routes.add_service(
        InferenceApIsServiceServer::new(GrpcApi(Ctx {
            ts,
            max_body_bytes: max_message_bytes,
        }))
        .max_decoding_message_size(max_message_bytes),
    )
}

/// The management service, as an axum router for its own listener.
pub fn management_routes(ts: Arc<TorchServe>, max_message_bytes: usize) -> axum::Router {
    let service = ManagementApIsServiceServer::new(GrpcApi(Ctx {
        ts,
        max_body_bytes: max_message_bytes,
    }))
    .max_decoding_message_size(max_message_bytes);
    tonic::service::Routes::new(service).into_axum_router()
}

#[derive(Clone)]
pub struct GrpcApi(Ctx);

/// TorchServe's HTTP status as a gRPC code.
fn code_for(status: u16) -> Code {
    match status {
        400 | 413 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        405 | 501 => Code::Unimplemented,
        408 | 504 => Code::DeadlineExceeded,
        409 => Code::AlreadyExists,
        429 | 503 => Code::Unavailable,
        507 => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

fn ts_status(e: TsError) -> Status {
    let (status, _) = api::status_and_type(e.0.kind());
    Status::new(code_for(status.as_u16()), e.0.message())
}

/// An HTTP API answer as a management response: its JSON in `msg`, or its error as a status.
async fn management_answer(
    answer: Result<HttpResponse, TsError>,
) -> Result<Response<ManagementResponse>, Status> {
    let response = answer.map_err(ts_status)?;
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 26)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        return Ok(Response::new(ManagementResponse { msg: text }));
    }
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or(text);
    Err(Status::new(code_for(status.as_u16()), message))
}

fn version(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| v.to_string())
}

fn positive(n: i32) -> Option<u32> {
    u32::try_from(n).ok().filter(|n| *n > 0)
}

#[tonic::async_trait]
impl ManagementApIsService for GrpcApi {
    async fn describe_model(
        &self,
        request: Request<DescribeModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = request.into_inner();
        management_answer(api::describe(
            &self.0,
            &r.model_name,
            version(&r.model_version).as_deref(),
        ))
        .await
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = request.into_inner();
        let query = ListQuery {
            limit: positive(r.limit).map(|n| n.to_string()),
            next_page_token: positive(r.next_page_token).map(|n| n.to_string()),
        };
        management_answer(api::list(State(self.0.clone()), Query(query)).await).await
    }

    async fn register_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = request.into_inner();
        let query = RegisterQuery {
            url: Some(r.url).filter(|u| !u.is_empty()),
            model_name: Some(r.model_name).filter(|n| !n.is_empty()),
            initial_workers: positive(r.initial_workers),
            batch_size: positive(r.batch_size),
            max_batch_delay: positive(r.max_batch_delay).map(u64::from),
            response_timeout: positive(r.response_timeout).map(u64::from),
            // TorchServe's gRPC default is asynchronous (proto3 false).
            synchronous: Some(r.synchronous),
        };
        management_answer(api::register(State(self.0.clone()), Query(query)).await).await
    }

    async fn scale_worker(
        &self,
        request: Request<ScaleWorkerRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = request.into_inner();
        let query = ScaleQuery {
            min_worker: u32::try_from(r.min_worker).ok(),
            max_worker: positive(r.max_worker),
            synchronous: Some(r.synchronous),
        };
        management_answer(
            api::scale(
                &self.0,
                &r.model_name,
                version(&r.model_version).as_deref(),
                query,
            )
            .await,
        )
        .await
    }

    async fn set_default(
        &self,
        request: Request<SetDefaultRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = request.into_inner();
        management_answer(
            api::set_default(State(self.0.clone()), Path((r.model_name, r.model_version))).await,
        )
        .await
    }

    async fn unregister_model(
        &self,
        request: Request<UnregisterModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = request.into_inner();
        management_answer(api::unregister(&self.0, &r.model_name, version(&r.model_version).as_deref()).await)
            .await
    }
}

type PredictionStream = Pin<Box<dyn Stream<Item = Result<PredictionResponse, Status>> + Send + 'static>>;

impl GrpcApi {
    /// One prediction: the handler's answer bytes, or its failure as a status.
    async fn predict(&self, request: PredictionsRequest) -> Result<Bytes, Status> {
        let ts = &self.0.ts;
        let model = request.model_name;
        let version = version(&request.model_version);
        let entry = ts
            .version(&model, version.as_deref())
            .map_err(|e| ts_status(TsError(e)))?;
        let mut inputs: Vec<(String, Vec<u8>)> = request.input.into_iter().collect();
        inputs.sort_by(|a, b| a.0.cmp(&b.0));
        if entry.handler.is_python() {
            let headers = [("explain".to_string(), "False".to_string())];
            let inputs: Vec<Input> = inputs
                .into_iter()
                .map(|(name, value)| Input {
                    name,
                    content_type: String::new(),
                    value: Bytes::from(value),
                })
                .collect();
            let part = encode_request(&headers, &inputs);
            return match ts
                .predict_python(&model, version.as_deref(), part)
                .await
                .map_err(|e| ts_status(TsError(e)))?
            {
                Reply::Response { status, body, .. } if (200..300).contains(&status) => Ok(Bytes::from(body)),
                Reply::Response { status, body, .. } => Err(Status::new(
                    code_for(u16::try_from(status).unwrap_or(500)),
                    String::from_utf8_lossy(&body).into_owned(),
                )),
                Reply::Failed { code, message } => {
                    Err(Status::new(code_for(u16::try_from(code).unwrap_or(500)), message))
                }
            };
        }
        // Native handlers read one input: `data`, else `body`, else the first.
        let pick = |name: &str| inputs.iter().position(|(n, _)| n == name);
        let index = pick("data").or_else(|| pick("body")).unwrap_or(0);
        let data = inputs
            .into_iter()
            .nth(index)
            .map(|(_, v)| Bytes::from(v))
            .ok_or_else(|| Status::invalid_argument("the request has no input"))?;
        let answer = ts
            .predict(&model, version.as_deref(), data)
            .await
            .map_err(|e| ts_status(TsError(e)))?;
        Ok(Bytes::from(answer))
    }
}

#[tonic::async_trait]
impl InferenceApIsService for GrpcApi {
    async fn ping(&self, _request: Request<()>) -> Result<Response<TorchServeHealthResponse>, Status> {
        let response = api::ping(State(self.0.clone())).await;
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(TorchServeHealthResponse {
            health: String::from_utf8_lossy(&body).into_owned(),
        }))
    }

    async fn predictions(
        &self,
        request: Request<PredictionsRequest>,
    ) -> Result<Response<PredictionResponse>, Status> {
        let prediction = self.predict(request.into_inner()).await?;
        Ok(Response::new(PredictionResponse {
            prediction: prediction.to_vec(),
            ..Default::default()
        }))
    }

    type StreamPredictionsStream = PredictionStream;

    /// The answer as one message (parts a handler streams are joined, as over HTTP).
    async fn stream_predictions(
        &self,
        request: Request<PredictionsRequest>,
    ) -> Result<Response<Self::StreamPredictionsStream>, Status> {
        let prediction = self.predict(request.into_inner()).await?;
        let message = PredictionResponse {
            prediction: prediction.to_vec(),
            ..Default::default()
        };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(message)
        }))))
    }

    type StreamPredictions2Stream = PredictionStream;

    /// Each request answered in order, with its sequence id; a failed one carries its status
    /// in the answer and the stream goes on.
    async fn stream_predictions2(
        &self,
        request: Request<tonic::Streaming<PredictionsRequest>>,
    ) -> Result<Response<Self::StreamPredictions2Stream>, Status> {
        let api = self.clone();
        let answers = request.into_inner().then(move |message| {
            let api = api.clone();
            async move {
                let request = message?;
                let sequence = request.sequence_id.clone();
                Ok(match api.predict(request).await {
                    Ok(prediction) => PredictionResponse {
                        prediction: prediction.to_vec(),
                        sequence_id: sequence,
                        status: None,
                    },
                    Err(status) => PredictionResponse {
                        prediction: Vec::new(),
                        sequence_id: sequence,
                        status: Some(pb::google::rpc::Status {
                            code: status.code() as i32,
                            message: status.message().to_string(),
                            details: Vec::new(),
                        }),
                    },
                })
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn torchserve_statuses_map_to_grpc_codes() {
        use tonic::Code;
        assert_eq!(super::code_for(404), Code::NotFound);
        assert_eq!(super::code_for(503), Code::Unavailable);
        assert_eq!(super::code_for(400), Code::InvalidArgument);
        assert_eq!(super::code_for(500), Code::Internal);
        assert_eq!(super::code_for(507), Code::ResourceExhausted);
    }
}
