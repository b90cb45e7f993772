//! The HTTP server: SageMaker hosting (`GET /ping`, `POST /invocations`) and TF Serving's REST
//! API (`/v1/models/<name>[/versions/<v>][/metadata|:predict]`), plus `GET /metrics`.
//!
//! The server binds first and loads the model on the inference thread, so `/ping` answers 503
//! until the model is ready (SageMaker polls it). Request handlers read and check the body,
//! decode and resize on tokio's blocking pool, queue a [`Job`] and wait for its rows; the
//! inference thread owns the model and batches ([`crate::batcher`]). Every error is a 4xx or
//! 5xx with `{"error": "<one sentence>"}`, and the server keeps serving. SIGTERM or Ctrl-C
//! stops accepting connections and lets in-flight requests finish (at most `shutdown_grace`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use burn::tensor::Device;
use lanner_models::precision::Precision;
use lanner_models::worker_threads::run_on_worker;
use serde_json::json;
use tokio::sync::{Notify, oneshot};

use crate::batcher::{BatchingConfig, Job, JobQueue, JobReceiver, job_queue, run_batcher};
use crate::model_dir::ModelDir;
use crate::predictor::{ModelInfo, Predictor};
use crate::preprocess::{ImageError, hwc_to_chw, image_bytes_to_pixels};
use crate::request::{Instance, Layout, parse_predict_json};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to bind.
    pub host: IpAddr,
    /// Port to bind (0: any free port).
    pub port: u16,
    /// The model's name in TF Serving's URLs.
    pub model_name: String,
    /// Dynamic batching and the queue bound.
    pub batching: BatchingConfig,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest image, width × height.
    pub max_image_pixels: u64,
    /// Longest a prediction request may take, reading its body included.
    pub request_timeout: Duration,
    /// Longest in-flight requests may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// The float type of the forward passes (bf16 and f16 on GPUs).
    pub precision: Precision,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address is taken or not ours.
    #[error(
        "cannot listen on {addr}: {source}; stop the program using that port or pass another --port (or --host)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The model could not be loaded.
    #[error("{0}")]
    Load(String),
    /// The async runtime did not start or the server failed.
    #[error("the HTTP server failed: {0}")]
    Runtime(std::io::Error),
}

/// An answer with `{"error": …}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message }).to_string();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// What every handler shares.
struct AppState {
    info: ModelInfo,
    config: ServeConfig,
    queue: JobQueue,
    ready: AtomicBool,
    load_error: Mutex<Option<String>>,
    load_failed: Notify,
    metrics: crate::metrics::Metrics,
    /// `x-lanner-class-names: ["cat","dog"]` on predictions (absent for non-ASCII names).
    class_names_header: Option<HeaderValue>,
}

/// Serves the model in `model` on `device` until SIGTERM or Ctrl-C; `on_listening` is told the
/// bound address once connections are accepted (the model may still be loading).
pub fn serve(
    model: ModelDir,
    device: Device,
    config: ServeConfig,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let card = model.card().map_err(|e| ServeError::Load(e.to_string()))?;
    let info = ModelInfo::new(&card, &model);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lanner-http")
        // Decoding is CPU work: more threads than cores only queue it in the kernel instead.
        .max_blocking_threads(cores.max(2) * 2)
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(run(model, device, info, config, on_listening))
}

/// The inference thread's work: loads the model (then `/ping` answers 200) and batches the
/// queued jobs until the handlers' queues are gone, or records why the model did not load.
fn serve_model(model: ModelDir, device: Device, inference: Arc<AppState>, jobs: JobReceiver) {
    // The unpacked archive is removed once the weights are in memory.
    let loaded = Predictor::load(&model, device, inference.config.precision);
    drop(model);
    match loaded {
        Ok(predictor) => {
            inference.ready.store(true, Ordering::SeqCst);
            eprintln!(
                "lanner serve: model loaded ({}, classes: {})",
                predictor.info.arch,
                predictor.info.class_names.join(", ")
            );
            let metrics = Arc::clone(&inference);
            let batching = inference.config.batching;
            // Only the handlers' queues keep the batcher running.
            drop(inference);
            run_batcher(
                jobs,
                batching,
                |pixels, count| predictor.predict(pixels, count),
                |size| metrics.metrics.record_batch(size),
            );
        }
        Err(error) => {
            if let Ok(mut slot) = inference.load_error.lock() {
                *slot = Some(error.to_string());
            }
            inference.load_failed.notify_one();
        }
    }
}

async fn run(
    model: ModelDir,
    device: Device,
    info: ModelInfo,
    config: ServeConfig,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(ServeError::Runtime)?;
    let (queue, jobs) = job_queue(config.batching.max_queue);
    let class_names_header = serde_json::to_string(&info.class_names)
        .ok()
        .and_then(|names| HeaderValue::from_str(&names).ok())
        .filter(|_| info.class_names.iter().all(|n| n.is_ascii()));
    let state = Arc::new(AppState {
        class_names_header,
        info,
        config: config.clone(),
        queue,
        ready: AtomicBool::new(false),
        load_error: Mutex::new(None),
        load_failed: Notify::new(),
        metrics: crate::metrics::Metrics::default(),
    });
    let inference = Arc::clone(&state);
    std::thread::Builder::new()
        .name("lanner-inference".into())
        .spawn(move || {
            // The work runs on a rayon worker (this thread waits), where each pass's
            // operations split without a thread hand-off each.
            run_on_worker(move || serve_model(model, device, inference, jobs))
        })
        .map_err(ServeError::Runtime)?;

    on_listening(bound);
    let app = router(Arc::clone(&state));
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let signal_state = Arc::clone(&state);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal(&signal_state).await;
        let _ = stopping_tx.send(true);
    });
    let grace = config.shutdown_grace;
    let deadline = async move {
        let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result.map_err(ServeError::Runtime)?,
        () = deadline => eprintln!(
            "lanner serve: requests still running {} s after the stop signal; exiting anyway",
            grace.as_secs()
        ),
    }
    let load_error = state.load_error.lock().ok().and_then(|e| e.clone());
    match load_error {
        Some(error) => Err(ServeError::Load(error)),
        None => Ok(()),
    }
}

/// SIGTERM, Ctrl-C, or a model that failed to load.
async fn shutdown_signal(state: &AppState) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = terminate => eprintln!("lanner serve: SIGTERM, finishing in-flight requests"),
        _ = tokio::signal::ctrl_c() => eprintln!("lanner serve: interrupted, finishing in-flight requests"),
        () = state.load_failed.notified() => {}
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/invocations", post(invocations))
        .route("/metrics", get(metrics))
        .route("/v1/models/{*rest}", get(model_get).post(model_post))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// Counts every answer by route pattern and status, and times it.
async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = route_label(request.method(), request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .record_request(route, response.status().as_u16(), started.elapsed());
    response
}

/// The route pattern of a path: metrics never carry raw paths.
fn route_label(method: &Method, path: &str) -> &'static str {
    match path {
        "/ping" => "/ping",
        "/invocations" => "/invocations",
        "/metrics" => "/metrics",
        p if p.starts_with("/v1/models/") => {
            if p.ends_with(":predict") && method == Method::POST {
                "/v1/models/{name}:predict"
            } else if p.ends_with("/metadata") {
                "/v1/models/{name}/metadata"
            } else {
                "/v1/models/{name}"
            }
        }
        _ => "other",
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route; this server answers GET /ping, POST /invocations, GET /metrics and TF Serving's /v1/models/<name>[:predict|/metadata]",
    )
}

async fn ping(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        return StatusCode::OK.into_response();
    }
    match state.load_error.lock().ok().and_then(|e| e.clone()) {
        Some(error) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error).into_response(),
        None => not_ready().into_response(),
    }
}

fn not_ready() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the model is still loading; retry in a moment",
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state
        .metrics
        .render(state.queue.depth(), state.ready.load(Ordering::SeqCst));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// What the body of a prediction request holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BodyKind {
    /// One encoded image.
    Image,
    /// TF Serving JSON; `bare_list` allows a top-level list.
    Json { bare_list: bool },
}

/// How the predictions are written back.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Json,
    Csv,
}

async fn invocations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let kind = match content_kind(&headers) {
        Ok(kind) => kind,
        Err(error) => return error.into_response(),
    };
    predict(&state, &headers, body, kind).await
}

/// `Content-Type` of `/invocations`: images or JSON.
fn content_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request has no Content-Type; send image/jpeg, image/png, application/x-image or application/json",
        ));
    };
    let media = media_type(value);
    match media.as_str() {
        "application/json" => Ok(BodyKind::Json { bare_list: true }),
        "application/x-image" | "application/octet-stream" => Ok(BodyKind::Image),
        m if m.starts_with("image/") => Ok(BodyKind::Image),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type {media} is not supported; send image/jpeg, image/png, application/x-image or application/json"
            ),
        )),
    }
}

/// The media type of a header value, lower case, without parameters.
fn media_type(value: &HeaderValue) -> String {
    value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// JSON unless `Accept` asks for CSV first; 406 when it accepts neither.
fn answer_format(headers: &HeaderMap) -> Result<Answer, ApiError> {
    let Some(value) = headers.get(header::ACCEPT) else {
        return Ok(Answer::Json);
    };
    let text = value.to_str().unwrap_or("");
    for part in text.split(',') {
        let media = part
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "" | "*/*" | "application/*" | "application/json" => return Ok(Answer::Json),
            "text/*" | "text/csv" => return Ok(Answer::Csv),
            _ => {}
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        format!("cannot answer in {text}; accept application/json or text/csv"),
    ))
}

/// `/v1/models/<rest>`: the model, one of its versions, and what is asked of it.
#[derive(Debug, PartialEq)]
struct ModelPath<'a> {
    name: &'a str,
    version: Option<&'a str>,
    metadata: bool,
    verb: Option<&'a str>,
}

fn parse_model_path(rest: &str) -> Option<ModelPath<'_>> {
    let (path, verb) = match rest.rsplit_once(':') {
        Some((path, verb)) if !verb.contains('/') => (path, Some(verb)),
        _ => (rest, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (name, version, metadata) = match parts.as_slice() {
        [name] => (*name, None, false),
        [name, "metadata"] => (*name, None, true),
        [name, "versions", v] => (*name, Some(*v), false),
        [name, "versions", v, "metadata"] => (*name, Some(*v), true),
        _ => return None,
    };
    if metadata && verb.is_some() {
        return None;
    }
    Some(ModelPath {
        name,
        version,
        metadata,
        verb,
    })
}

impl AppState {
    /// The model path, checked against this server's model name and version.
    fn model_path<'a>(&self, rest: &'a str) -> Result<ModelPath<'a>, ApiError> {
        let Some(path) = parse_model_path(rest) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "/v1/models/{rest} is not a TF Serving URL; use /v1/models/{name}, /v1/models/{name}/metadata or /v1/models/{name}:predict",
                    name = self.config.model_name
                ),
            ));
        };
        if path.name != self.config.model_name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "Servable not found for request: Latest({}); this server's model is named '{}' (--model-name)",
                    path.name, self.config.model_name
                ),
            ));
        }
        if let Some(version) = path.version
            && version != self.info.version.to_string()
        {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "Servable not found for request: Specific({}, {version}); the model has version {}",
                    path.name, self.info.version
                ),
            ));
        }
        Ok(path)
    }
}

async fn model_get(State(state): State<Arc<AppState>>, UrlPath(rest): UrlPath<String>) -> Response {
    let path = match state.model_path(&rest) {
        Ok(path) if path.verb.is_none() => path,
        Ok(_) => {
            return ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "predictions are POST requests; POST JSON to /v1/models/<name>:predict",
            )
            .into_response();
        }
        Err(error) => return error.into_response(),
    };
    let version = state.info.version.to_string();
    let body = if path.metadata {
        metadata_json(&state, &version)
    } else {
        let (model_state, code, message) = if state.ready.load(Ordering::SeqCst) {
            ("AVAILABLE", "OK", String::new())
        } else if let Some(error) = state.load_error.lock().ok().and_then(|e| e.clone()) {
            ("END", "UNKNOWN", error)
        } else {
            ("LOADING", "OK", String::new())
        };
        json!({"model_version_status": [{
            "version": version,
            "state": model_state,
            "status": {"error_code": code, "error_message": message},
        }]})
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// TF Serving's signature metadata for a Keras image model, plus the class names under
/// `lanner` (clients read the keys they know).
fn metadata_json(state: &AppState, version: &str) -> serde_json::Value {
    let info = &state.info;
    let dim = |size: i64| json!({"size": size.to_string(), "name": ""});
    let size = info.image_size as i64;
    json!({
        "model_spec": {"name": state.config.model_name, "signature_name": "", "version": version},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": {"input_1": {
                "dtype": "DT_FLOAT",
                "tensor_shape": {"dim": [dim(-1), dim(size), dim(size), dim(3)], "unknown_rank": false},
                "name": "serving_default_input_1:0",
            }},
            "outputs": {"output_0": {
                "dtype": "DT_FLOAT",
                "tensor_shape": {"dim": [dim(-1), dim(info.outputs as i64)], "unknown_rank": false},
                "name": "StatefulPartitionedCall:0",
            }},
            "method_name": "tensorflow/serving/predict",
        }}}},
        "lanner": {
            "arch": info.arch,
            "class_names": info.class_names,
            "image_size": info.image_size,
            "activation": if info.is_binary() { "sigmoid" } else { "softmax" },
        },
    })
}

async fn model_post(
    State(state): State<Arc<AppState>>,
    UrlPath(rest): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match state.model_path(&rest) {
        Ok(path) if path.verb == Some("predict") => {}
        Ok(ModelPath {
            verb: Some(verb), ..
        }) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("this model answers :predict only, not :{verb}"),
            )
            .into_response();
        }
        Ok(_) => {
            return ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST to /v1/models/<name>:predict; GET the model's status or metadata",
            )
            .into_response();
        }
        Err(error) => return error.into_response(),
    }
    // TF Serving reads the body as JSON whatever its Content-Type says.
    predict(&state, &headers, body, BodyKind::Json { bare_list: false }).await
}

/// Reads, checks, queues and answers one prediction request.
async fn predict(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    kind: BodyKind,
) -> Response {
    let answer = match answer_format(headers) {
        Ok(answer) => answer,
        Err(error) => return error.into_response(),
    };
    if !state.ready.load(Ordering::SeqCst) {
        return not_ready().into_response();
    }
    let timeout = state.config.request_timeout;
    let work = predict_rows(state, headers, body, kind);
    let (rows, layout) = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(done)) => done,
        Ok(Err(error)) => {
            if error.status.is_server_error() {
                eprintln!("lanner serve: {} {}", error.status.as_u16(), error.message);
            }
            return error.into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the prediction took longer than {} ms (--request-timeout-ms); retry, or send fewer images per request",
                    timeout.as_millis()
                ),
            )
            .into_response();
        }
    };
    let mut response = match answer {
        Answer::Json => {
            // Serialised from f32 (not through `json!`, which widens to f64 digits).
            let body = std::collections::BTreeMap::from([(layout.response_key(), &rows)]);
            let body = serde_json::to_string(&body).expect("predictions serialise");
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Answer::Csv => {
            let mut text = String::new();
            for row in &rows {
                let values: Vec<String> = row.iter().map(f32::to_string).collect();
                text.push_str(&values.join(","));
                text.push('\n');
            }
            ([(header::CONTENT_TYPE, "text/csv")], text).into_response()
        }
    };
    if let Some(names) = &state.class_names_header {
        response
            .headers_mut()
            .insert("x-lanner-class-names", names.clone());
    }
    response
}

async fn predict_rows(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    kind: BodyKind,
) -> Result<(Vec<Vec<f32>>, Layout), ApiError> {
    let bytes = read_body(body, headers, state.config.max_body_bytes).await?;
    let info = state.info.clone();
    let max_pixels = state.config.max_image_pixels;
    let (pixels, count, layout) =
        tokio::task::spawn_blocking(move || prepare(&bytes, kind, &info, max_pixels))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "preparing the images failed (see the server log)",
                )
            })??;
    let (reply, rows) = oneshot::channel();
    let job = Job {
        pixels,
        count,
        queued_at: Instant::now(),
        reply,
    };
    state.queue.submit(job).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy ({} requests are waiting, --max-queue); retry after a second",
                state.config.batching.max_queue
            ),
        )
    })?;
    let rows = rows
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the inference thread stopped; the server is shutting down",
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok((rows, layout))
}

/// The body, refused with 413 beyond `max` bytes.
async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {max} bytes (--max-body-bytes); send smaller or fewer images"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    to_bytes(body, max).await.map_err(|error| {
        let inner = error.into_inner();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*inner);
        let mut over_limit = false;
        while let Some(error) = cause {
            over_limit |= error.is::<http_body_util::LengthLimitError>();
            cause = error.source();
        }
        if over_limit {
            too_large()
        } else {
            ApiError::bad_request(format!("the request body could not be read ({inner})"))
        }
    })
}

/// Decodes the body into `[n, 3, H, W]` pixels (on the blocking pool).
fn prepare(
    bytes: &[u8],
    kind: BodyKind,
    info: &ModelInfo,
    max_pixels: u64,
) -> Result<(Vec<f32>, usize, Layout), ApiError> {
    let size = info.image_size;
    match kind {
        BodyKind::Image => {
            if bytes.is_empty() {
                return Err(ApiError::bad_request(
                    "the request body is empty; send the bytes of a JPEG or PNG image",
                ));
            }
            let pixels = image_bytes_to_pixels(bytes, size, max_pixels)
                .map_err(|e| image_error(e, "the request body", max_pixels))?;
            Ok((pixels, 1, Layout::Row))
        }
        BodyKind::Json { bare_list } => {
            let request = parse_predict_json(bytes, size, bare_list)
                .map_err(|e| ApiError::bad_request(e.0))?;
            let count = request.instances.len();
            let mut pixels = Vec::with_capacity(count * info.pixels_per_image());
            for (index, instance) in request.instances.into_iter().enumerate() {
                match instance {
                    Instance::Image(bytes) => {
                        pixels.extend(image_bytes_to_pixels(&bytes, size, max_pixels).map_err(
                            |e| image_error(e, &format!("instance {index}"), max_pixels),
                        )?)
                    }
                    Instance::Pixels(hwc) => pixels.extend(hwc_to_chw(&hwc, size, size)),
                }
            }
            Ok((pixels, count, request.layout))
        }
    }
}

/// 413 for an image over the pixel limit, 400 for anything else, the sentence naming `what`.
fn image_error(error: ImageError, what: &str, max_pixels: u64) -> ApiError {
    match error {
        ImageError::TooLarge { width, height, .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{what} is {width}x{height} pixels, over the limit of {max_pixels} pixels (--max-image-pixels); send a smaller image"
            ),
        ),
        ImageError::Empty => ApiError::bad_request(format!("{what} is empty (0 bytes)")),
        other => ApiError::bad_request(format!(
            "{what} cannot be used: {other}; send the bytes of a JPEG, PNG, BMP or GIF file"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_serving_urls() {
        assert_eq!(
            parse_model_path("model:predict"),
            Some(ModelPath {
                name: "model",
                version: None,
                metadata: false,
                verb: Some("predict")
            })
        );
        assert_eq!(
            parse_model_path("model/versions/1:predict")
                .unwrap()
                .version,
            Some("1")
        );
        assert!(
            parse_model_path("model/versions/2/metadata")
                .unwrap()
                .metadata
        );
        assert!(parse_model_path("model/metadata").unwrap().metadata);
        assert_eq!(parse_model_path("model").unwrap().verb, None);
        assert_eq!(parse_model_path("model/labels/stable"), None);
        assert_eq!(parse_model_path("model/metadata:predict"), None);
    }

    #[test]
    fn content_and_accept_negotiation() {
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(name.clone(), HeaderValue::from_str(value).unwrap());
            }
            map
        };
        let kind =
            |ct: &str| content_kind(&headers(&[(header::CONTENT_TYPE, ct)])).map_err(|e| e.status);
        assert_eq!(kind("image/jpeg"), Ok(BodyKind::Image));
        assert_eq!(kind("application/x-image"), Ok(BodyKind::Image));
        assert_eq!(
            kind("Application/JSON; charset=utf-8"),
            Ok(BodyKind::Json { bare_list: true })
        );
        assert_eq!(kind("text/plain"), Err(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        assert_eq!(
            content_kind(&HeaderMap::new()).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let accept =
            |a: &str| answer_format(&headers(&[(header::ACCEPT, a)])).map_err(|e| e.status);
        assert_eq!(accept("text/csv"), Ok(Answer::Csv));
        assert_eq!(accept("application/json, text/csv"), Ok(Answer::Json));
        assert_eq!(accept("text/html, */*;q=0.8"), Ok(Answer::Json));
        assert_eq!(accept("text/html"), Err(StatusCode::NOT_ACCEPTABLE));
        assert_eq!(answer_format(&HeaderMap::new()).unwrap(), Answer::Json);
    }

    #[test]
    fn metrics_label_routes_not_paths() {
        assert_eq!(
            route_label(&Method::POST, "/v1/models/foo:predict"),
            "/v1/models/{name}:predict"
        );
        assert_eq!(
            route_label(&Method::GET, "/v1/models/foo/versions/3/metadata"),
            "/v1/models/{name}/metadata"
        );
        assert_eq!(
            route_label(&Method::GET, "/v1/models/foo"),
            "/v1/models/{name}"
        );
        assert_eq!(route_label(&Method::GET, "/random/path"), "other");
    }
}
