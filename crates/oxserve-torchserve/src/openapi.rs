//! The API descriptions TorchServe answers `OPTIONS /` and `GET /api-description` with: an
//! OpenAPI 3.0.1 document of each port's endpoints (written for what oxserve serves).

use serde_json::{Value, json};

fn operation(summary: &str, parameters: &[(&str, &str)]) -> Value {
    let params: Vec<Value> = parameters
        .iter()
        .map(|(name, place)| json!({"in": place, "name": name, "required": *place == "path", "schema": {"type": "string"}}))
        .collect();
    json!({
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
            "default": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        }
    })
}

fn document(paths: Value) -> Value {
    json!({
        "openapi": "3.0.1",
        "info": {
            "title": "TorchServe APIs",
            "description": "TorchServe's APIs as oxserve serves them (docs/torchserve.md)",
            "version": "0.12.0"
        },
        "paths": paths,
        "components": {"schemas": {"Error": {"type": "object", "properties": {
            "code": {"type": "integer"}, "type": {"type": "string"}, "message": {"type": "string"}
        }}}}
    })
}

/// The inference port's description.
pub fn inference() -> Value {
    let model = [("model_name", "path")];
    let versioned = [("model_name", "path"), ("model_version", "path")];
    document(json!({
        "/": {"options": operation("This API description", &[])},
        "/api-description": {"get": operation("This API description", &[])},
        "/ping": {"get": operation("Health: {\"status\": \"Healthy\"}", &[])},
        "/predictions/{model_name}": {"post": operation("A prediction with the model's default version (raw body or multipart form)", &model)},
        "/predictions/{model_name}/{model_version}": {"post": operation("A prediction with one version of the model", &versioned)},
        "/v1/models/{model_name}:predict": {"post": operation("A prediction in KServe v1 / TF Serving's JSON", &model)},
        "/v2/models/{model_name}/infer": {"post": operation("A prediction in KServe v2's JSON or binary form", &model)}
    }))
}

/// The management port's description.
pub fn management() -> Value {
    let model = [("model_name", "path")];
    let versioned = [("model_name", "path"), ("model_version", "path")];
    document(json!({
        "/": {"options": operation("This API description", &[])},
        "/api-description": {"get": operation("This API description", &[])},
        "/models": {
            "get": operation("List the registered models", &[("limit", "query"), ("next_page_token", "query")]),
            "post": operation("Register a model archive of the model store", &[
                ("url", "query"), ("model_name", "query"), ("initial_workers", "query"), ("batch_size", "query"),
                ("max_batch_delay", "query"), ("response_timeout", "query"), ("synchronous", "query")
            ])
        },
        "/models/{model_name}": {
            "get": operation("Describe every version of a model", &model),
            "put": operation("Scale a model's workers", &[("model_name", "path"), ("min_worker", "query"), ("max_worker", "query"), ("synchronous", "query")]),
            "delete": operation("Unregister a model's default version", &model)
        },
        "/models/{model_name}/{model_version}": {
            "get": operation("Describe one version of a model", &versioned),
            "put": operation("Scale a model's workers", &versioned),
            "delete": operation("Unregister one version of a model", &versioned)
        },
        "/models/{model_name}/{model_version}/set-default": {"put": operation("Make a version the default", &versioned)}
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_ports_describe_their_paths() {
        let inference = super::inference();
        assert_eq!(inference["openapi"], "3.0.1");
        assert!(inference["paths"]["/predictions/{model_name}"]["post"].is_object());
        let management = super::management();
        assert!(management["paths"]["/models"]["post"].is_object());
        assert!(management["paths"]["/models/{model_name}/{model_version}/set-default"]["put"].is_object());
    }
}
