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
    pub param: Option<String>,
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
    pub fn invalid(message: impl Into<String>, param: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, "invalid_request_error").param(param)
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
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
        let obj = body_object(v)?;
        let model = model_field(obj)?;
        let inputs = inputs_field(obj, "input")?
            .ok_or_else(|| ApiError::invalid("you must provide an input", "input"))?;
        Ok(ClassifyRequest { model, inputs })
    }
}

fn body_object(v: &Value) -> Result<&serde_json::Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::invalid("the request body must be a JSON object", "body"))
}

/// A string, an array of strings, an array of token ids, or an array of such arrays
/// (OpenAI's shapes for `prompt` and `input`); `None` when absent or null.
pub fn inputs_field(
    obj: &serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<Vec<crate::classify::Input>>, ApiError> {
    use crate::classify::Input;
    let ids = |x: &Value| -> Option<Vec<u32>> {
        x.as_array()?
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    let bad = || {
        ApiError::invalid(
            format!("'{name}' must be a non-empty string, array of strings, array of token ids or array of such arrays"),
            name,
        )
    };
    let inputs = match obj.get(name).filter(|x| !x.is_null()) {
        None => return Ok(None),
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
                _ => ids(x).filter(|v| !v.is_empty()).map(Input::Ids),
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
            name,
        ));
    }
    Ok(Some(inputs))
}

/// `POST /v1/embeddings`, validated: `{"model", "input", "encoding_format"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<crate::classify::Input>,
    /// `encoding_format: "base64"` (the official Python client's default).
    pub base64: bool,
}

impl EmbeddingRequest {
    pub fn parse(v: &Value) -> Result<Self, ApiError> {
        let obj = body_object(v)?;
        refuse_unsupported(obj, &["model", "input", "encoding_format", "user"])?;
        let model = model_field(obj)?;
        let inputs = inputs_field(obj, "input")?
            .ok_or_else(|| ApiError::invalid("you must provide an input", "input"))?;
        let base64 = match obj.get("encoding_format").filter(|x| !x.is_null()) {
            None => false,
            Some(Value::String(f)) if f == "float" => false,
            Some(Value::String(f)) if f == "base64" => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("'encoding_format' must be \"float\" or \"base64\", got {other}"),
                    "encoding_format",
                ))
            }
        };
        Ok(EmbeddingRequest {
            model,
            inputs,
            base64,
        })
    }
}

/// A 400 naming the first parameter outside `known` that is set to something other
/// than the value that changes nothing: never silently ignored.
fn refuse_unsupported(
    obj: &serde_json::Map<String, Value>,
    known: &[&str],
) -> Result<(), ApiError> {
    for (name, value) in obj {
        if !known.contains(&name.as_str()) && !value.is_null() && !neutral(name, value) {
            return Err(ApiError::invalid(
                format!("'{name}' is not supported by this server"),
                name.as_str(),
            )
            .code("unsupported_parameter"));
        }
    }
    Ok(())
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
    pub prompts: Vec<crate::classify::Input>,
    /// 0 only with `echo` (score the prompt, generate nothing).
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub echo: bool,
    /// Log-probabilities of the returned tokens, with this many alternatives (0–5).
    pub logprobs: Option<usize>,
}

/// Most choices one request may ask for (`n` × prompts).
pub const MAX_CHOICES: usize = 64;

/// OpenAI's legacy completion parameters this server implements.
const COMPLETION_PARAMS: [&str; 12] = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "echo",
    "logprobs",
    "user",
];

/// Parameters of OpenAI's API this server does not implement, accepted only at the value
/// that changes nothing.
fn neutral(name: &str, v: &Value) -> bool {
    match name {
        "best_of" => v.as_u64() == Some(1),
        "frequency_penalty" | "presence_penalty" => v.as_f64() == Some(0.0),
        "logit_bias" => v.as_object().is_some_and(|m| m.is_empty()),
        "suffix" => v.as_str() == Some(""),
        _ => false,
    }
}

impl CompletionRequest {
    /// Reads the OpenAI fields, with OpenAI's defaults (max_tokens 16, temperature 1,
    /// top_p 1, n 1). A parameter the server does not implement is refused by name,
    /// never silently ignored.
    pub fn parse(v: &Value, max_tokens_limit: usize) -> Result<Self, ApiError> {
        use crate::classify::Input;
        let obj = body_object(v)?;
        refuse_unsupported(obj, &COMPLETION_PARAMS)?;
        let field = |name: &'static str| obj.get(name).filter(|x| !x.is_null());
        let model = model_field(obj)?;
        let prompts =
            inputs_field(obj, "prompt")?.unwrap_or_else(|| vec![Input::Text(String::new())]);
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
        let (stream, echo) = (flag("stream")?, flag("echo")?);
        let max_tokens = uint("max_tokens", 16)? as usize;
        let least = if echo { 0 } else { 1 };
        if max_tokens < least || max_tokens > max_tokens_limit {
            return Err(ApiError::invalid(
                format!("'max_tokens' must be between {least} and {max_tokens_limit}, got {max_tokens} (0 only with echo)"),
                "max_tokens",
            ));
        }
        let logprobs = match field("logprobs") {
            None => None,
            Some(x) => match x.as_u64() {
                Some(n) if n <= 5 => Some(n as usize),
                _ => {
                    return Err(ApiError::invalid(
                        format!("'logprobs' must be an integer from 0 to 5, got {x}"),
                        "logprobs",
                    ))
                }
            },
        };
        if stream && logprobs.is_some() {
            return Err(ApiError::invalid(
                "'logprobs' is not supported with 'stream'; send the request without streaming",
                "logprobs",
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
            stream,
            echo,
            logprobs,
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
    fn token_prompts_echo_and_logprobs() {
        use crate::classify::Input;
        let r = CompletionRequest::parse(
            &json!({"model": "m", "prompt": [[5, 6, 7], [8]], "echo": true, "max_tokens": 0, "logprobs": 5, "temperature": 0, "seed": 1234, "logit_bias": {}, "best_of": 1, "frequency_penalty": 0}),
            100,
        )
        .unwrap();
        assert_eq!(
            r.prompts,
            vec![Input::Ids(vec![5, 6, 7]), Input::Ids(vec![8])]
        );
        assert_eq!((r.echo, r.max_tokens, r.logprobs), (true, 0, Some(5)));
        let r =
            CompletionRequest::parse(&json!({"model": "m", "prompt": [5, 6], "logprobs": 0}), 100)
                .unwrap();
        assert_eq!((r.prompts.len(), r.logprobs), (1, Some(0)));
    }

    #[test]
    fn rejects_wrong_types_and_limits_naming_the_param() {
        let cases = [
            (json!({"prompt": "x"}), "model"),
            (json!({"model": 3, "prompt": "x"}), "model"),
            (json!({"model": "m", "prompt": 5}), "prompt"),
            (json!({"model": "m", "prompt": [1, -2]}), "prompt"),
            (json!({"model": "m", "prompt": [[1], []]}), "prompt"),
            (json!({"model": "m", "prompt": []}), "prompt"),
            (json!({"model": "m", "logprobs": 6}), "logprobs"),
            (json!({"model": "m", "logprobs": true}), "logprobs"),
            (
                json!({"model": "m", "logprobs": 1, "stream": true}),
                "logprobs",
            ),
            (json!({"model": "m", "max_tokens": 0}), "max_tokens"),
            (
                json!({"model": "m", "logit_bias": {"50": 100}}),
                "logit_bias",
            ),
            (json!({"model": "m", "suffix": "end"}), "suffix"),
            (json!({"model": "m", "best_of": 3}), "best_of"),
            (
                json!({"model": "m", "presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (json!({"model": "m", "top_k": 5}), "top_k"),
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
                (e.status, e.param.as_deref()),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{body}"
            );
        }
    }
}
