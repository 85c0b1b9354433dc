//! OpenAI wire types: the completion request as the API defines it, and its errors.

use crate::generate::SamplingOptions;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// A 400 about one request parameter.
    pub fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, "invalid_request_error").param(param)
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

/// `POST /v1/classify`, validated: `{"model", "input"}` where `input` is a string, an
/// array of strings, an array of token ids, or an array of such arrays (as OpenAI's
/// embeddings take them).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyRequest {
    pub model: String,
    pub inputs: Vec<crate::classify::Input>,
}

/// Most inputs one classify request may hold.
pub const MAX_INPUTS: usize = 256;

impl ClassifyRequest {
    pub fn parse(v: &Value) -> Result<Self, ApiError> {
        use crate::classify::Input;
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::invalid("the request body must be a JSON object", "body"))?;
        let model = model_field(obj)?;
        let ids = |x: &Value| -> Option<Vec<u32>> {
            x.as_array()?
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect()
        };
        let bad = || {
            ApiError::invalid(
                "'input' must be a string, an array of strings, an array of token ids or an array of such arrays",
                "input",
            )
        };
        let inputs = match obj.get("input").filter(|x| !x.is_null()) {
            None => return Err(ApiError::invalid("you must provide an input", "input")),
            Some(Value::String(s)) => vec![Input::Text(s.clone())],
            Some(Value::Array(items)) if items.is_empty() => return Err(bad()),
            Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
                vec![Input::Ids(
                    ids(&Value::Array(items.clone())).ok_or_else(bad)?,
                )]
            }
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| match x {
                    Value::String(s) => Some(Input::Text(s.clone())),
                    _ => ids(x).map(Input::Ids),
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?,
            Some(_) => return Err(bad()),
        };
        if inputs.len() > MAX_INPUTS {
            return Err(ApiError::invalid(
                format!(
                    "at most {MAX_INPUTS} inputs a request; this one has {}",
                    inputs.len()
                ),
                "input",
            ));
        }
        Ok(ClassifyRequest { model, inputs })
    }
}

/// The required string field `model`.
fn model_field(obj: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    match obj.get("model").filter(|x| !x.is_null()) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::invalid("'model' must be a string", "model")),
        None => Err(ApiError::invalid(
            "you must provide a model parameter",
            "model",
        )),
    }
}

/// `POST /v1/completions`, validated.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub prompts: Vec<String>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub echo: bool,
}

/// Most choices one request may ask for (`n` × prompts).
pub const MAX_CHOICES: usize = 64;

impl CompletionRequest {
    /// Reads the OpenAI fields, with OpenAI's defaults (max_tokens 16, temperature 1,
    /// top_p 1, n 1); unknown fields are ignored as the API does.
    pub fn parse(v: &Value, max_tokens_limit: usize) -> Result<Self, ApiError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::invalid("the request body must be a JSON object", "body"))?;
        let field = |name: &'static str| obj.get(name).filter(|x| !x.is_null());
        let model = model_field(obj)?;
        let prompts = match field("prompt") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items))
                if !items.is_empty() && items.iter().all(Value::is_string) =>
            {
                items
                    .iter()
                    .map(|s| s.as_str().unwrap_or_default().to_string())
                    .collect()
            }
            None => vec![String::new()],
            Some(_) => {
                return Err(ApiError::invalid(
                    "'prompt' must be a string or a non-empty array of strings",
                    "prompt",
                ))
            }
        };
        let uint = |name: &'static str, default: u64| -> Result<u64, ApiError> {
            match field(name) {
                None => Ok(default),
                Some(x) => x.as_u64().ok_or_else(|| {
                    ApiError::invalid(format!("'{name}' must be a non-negative integer"), name)
                }),
            }
        };
        let number =
            |name: &'static str, default: f64, lo: f64, hi: f64| -> Result<f64, ApiError> {
                let x = match field(name) {
                    None => default,
                    Some(x) => x.as_f64().ok_or_else(|| {
                        ApiError::invalid(format!("'{name}' must be a number"), name)
                    })?,
                };
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(
                        format!("'{name}' must be between {lo} and {hi}, got {x}"),
                        name,
                    ));
                }
                Ok(x)
            };
        let flag = |name: &'static str| -> Result<bool, ApiError> {
            match field(name) {
                None => Ok(false),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| ApiError::invalid(format!("'{name}' must be a boolean"), name)),
            }
        };
        let max_tokens = uint("max_tokens", 16)? as usize;
        if max_tokens == 0 || max_tokens > max_tokens_limit {
            return Err(ApiError::invalid(
                format!("'max_tokens' must be between 1 and {max_tokens_limit}, got {max_tokens}"),
                "max_tokens",
            ));
        }
        let n = uint("n", 1)? as usize;
        if n == 0 || n * prompts.len() > MAX_CHOICES {
            return Err(ApiError::invalid(
                format!("'n' × prompts must be between 1 and {MAX_CHOICES}"),
                "n",
            ));
        }
        let stop = match field("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if items.len() <= 4 && items.iter().all(Value::is_string) => {
                items
                    .iter()
                    .map(|s| s.as_str().unwrap_or_default().to_string())
                    .collect()
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "'stop' must be a string or an array of up to 4 strings",
                    "stop",
                ))
            }
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop sequences must not be empty",
                "stop",
            ));
        }
        let seed = match field("seed") {
            None => None,
            Some(x) => Some(
                x.as_u64()
                    .or_else(|| x.as_i64().map(|i| i as u64))
                    .ok_or_else(|| ApiError::invalid("'seed' must be an integer", "seed"))?,
            ),
        };
        Ok(CompletionRequest {
            model,
            prompts,
            max_tokens,
            temperature: number("temperature", 1.0, 0.0, 2.0)?,
            top_p: number("top_p", 1.0, 0.0, 1.0)?,
            n,
            stop,
            seed,
            stream: flag("stream")?,
            echo: flag("echo")?,
        })
    }

    /// Sampling as OpenAI defines it: temperature 0 (or top_p 0) is greedy.
    pub fn sampling(&self, eot: u32) -> SamplingOptions {
        SamplingOptions {
            max_new_tokens: self.max_tokens,
            temperature: self.temperature.max(1e-6),
            top_k: None,
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            greedy: self.temperature == 0.0 || self.top_p == 0.0,
            stop_token: Some(eot),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_fields_and_defaults() {
        let r = CompletionRequest::parse(&json!({"model": "m", "prompt": ["a", "b"], "n": 2, "stop": "\n", "seed": 7, "temperature": 0}), 100).unwrap();
        assert_eq!(
            (r.prompts.len(), r.n, r.max_tokens, r.seed, r.stop.clone()),
            (2, 2, 16, Some(7), vec!["\n".to_string()])
        );
        assert!(r.sampling(0).greedy);
        let d = CompletionRequest::parse(
            &json!({"model": "m", "prompt": "x", "logprobs": null, "user": "u"}),
            100,
        )
        .unwrap();
        assert_eq!(
            (d.temperature, d.top_p, d.n, d.stream, d.echo),
            (1.0, 1.0, 1, false, false)
        );
    }

    #[test]
    fn rejects_wrong_types_and_limits_naming_the_param() {
        let cases = [
            (json!({"prompt": "x"}), "model"),
            (json!({"model": 3, "prompt": "x"}), "model"),
            (json!({"model": "m", "prompt": 5}), "prompt"),
            (json!({"model": "m", "prompt": [1, 2]}), "prompt"),
            (json!({"model": "m", "max_tokens": 101}), "max_tokens"),
            (json!({"model": "m", "max_tokens": "ten"}), "max_tokens"),
            (json!({"model": "m", "temperature": 3}), "temperature"),
            (json!({"model": "m", "top_p": -0.1}), "top_p"),
            (json!({"model": "m", "n": 0}), "n"),
            (
                json!({"model": "m", "stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (json!({"model": "m", "stream": "yes"}), "stream"),
            (json!({"model": "m", "seed": 1.5}), "seed"),
            (json!([1, 2]), "body"),
        ];
        for (body, param) in cases {
            let e = CompletionRequest::parse(&body, 100).unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{body}"
            );
        }
    }
}
