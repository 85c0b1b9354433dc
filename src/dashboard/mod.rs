//! `lmforge dashboard`: one page that watches the runs and sweeps under a directory
//! while they train. Read-only: the page and its script are compiled in, the JSON API
//! answers GETs about runs it found itself (an id from the client is looked up, never
//! joined onto a path), and every file is read through [`runs::open_inside`].

pub mod downsample;
pub mod runs;

use anyhow::{bail, Context, Result};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use runs::{Kind, RunLog};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Points a curve is sent with unless the page asks for fewer.
const DEFAULT_POINTS: usize = 600;
/// How long a directory walk is trusted before runs are looked for again.
const RESCAN: Duration = Duration::from_secs(2);

/// The runs and sweeps under one root, and what has been read of them.
pub struct Dashboard {
    /// Canonical once it exists: the path every file read is checked against.
    root: PathBuf,
    /// Whether `root` is canonical yet (a directory the runs will create is not).
    resolved: bool,
    runs: BTreeMap<String, RunLog>,
    sweeps: BTreeMap<String, PathBuf>,
    scanned: Option<Instant>,
}

impl Dashboard {
    /// A dashboard of `root`, which may not exist yet: runs started just before
    /// create it, and it is watched for.
    pub fn open(root: &Path) -> Result<Self> {
        let (root, resolved) = match root.canonicalize() {
            Ok(real) if real.is_dir() => (real, true),
            Ok(_) => bail!("{}: not a directory", root.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                std::path::absolute(root)
                    .with_context(|| format!("{}: cannot open", root.display()))?,
                false,
            ),
            Err(e) => bail!("{}: cannot open runs directory: {e}", root.display()),
        };
        Ok(Dashboard {
            root,
            resolved,
            runs: BTreeMap::new(),
            sweeps: BTreeMap::new(),
            scanned: None,
        })
    }

    /// Looks for new runs and sweeps, at most every [`RESCAN`].
    fn scan(&mut self) {
        if !self.resolved {
            match self.root.canonicalize() {
                Ok(real) if real.is_dir() => (self.root, self.resolved) = (real, true),
                _ => return,
            }
        }
        if self.scanned.is_none_or(|t| t.elapsed() >= RESCAN) {
            let found = runs::discover(&self.root);
            self.runs.retain(|id, _| found.contains_key(id));
            self.sweeps.clear();
            for (id, (dir, kind)) in found {
                match kind {
                    Kind::Run => {
                        self.runs
                            .entry(id.clone())
                            .or_insert_with(|| RunLog::new(id, dir));
                    }
                    Kind::Sweep => {
                        self.sweeps.insert(id, dir);
                    }
                }
            }
            self.scanned = Some(Instant::now());
        }
    }

    /// Looks for new runs and reads what every run appended, all runs at once.
    fn refresh(&mut self) {
        self.scan();
        use rayon::prelude::*;
        let root = &self.root;
        self.runs.par_iter_mut().for_each(|(_, run)| {
            if let Err(e) = run.refresh(root) {
                tracing::warn!("{}: {e}", run.id);
            }
        });
    }

    /// The runs table and the sweeps' names.
    pub fn overview(&mut self) -> Value {
        self.refresh();
        let rows: Vec<_> = self.runs.values().map(|r| r.row(&self.root)).collect();
        json!({
            "root": self.root.display().to_string(),
            "runs": rows,
            "sweeps": self.sweeps.keys().collect::<Vec<_>>(),
        })
    }

    /// One run, with what it appended read.
    fn run(&mut self, id: &str) -> Result<&RunLog, ApiError> {
        self.scan();
        let run = self.runs.get_mut(id).ok_or_else(|| {
            ApiError::not_found(format!("no run {id:?} under the runs directory"))
        })?;
        if let Err(e) = run.refresh(&self.root) {
            tracing::warn!("{id}: {e}");
        }
        Ok(run)
    }

    /// A run's curves (those `keys` names, or all), downsampled to `points` points.
    pub fn curves(
        &mut self,
        id: &str,
        points: usize,
        keys: Option<Vec<String>>,
    ) -> Result<Value, ApiError> {
        let run = self.run(id)?;
        let keys: Option<Vec<&str>> = keys
            .as_ref()
            .map(|k| k.iter().map(String::as_str).collect());
        let curves = run.curves(points, keys.as_deref());
        Ok(json!({"id": id, "lines": run.lines(), "curves": curves}))
    }

    fn run_dir(&mut self, id: &str) -> Result<PathBuf, ApiError> {
        let dir = self.run(id)?.dir().to_path_buf();
        Ok(dir)
    }

    pub fn samples(&mut self, id: &str, n: usize) -> Result<Value, ApiError> {
        let dir = self.run_dir(id)?;
        Ok(json!({"id": id, "samples": runs::samples(&self.root, &dir, n)}))
    }

    pub fn config(&mut self, id: &str) -> Result<Value, ApiError> {
        let dir = self.run_dir(id)?;
        Ok(json!({"id": id, "config": runs::config(&self.root, &dir)}))
    }

    pub fn diff(&mut self, a: &str, b: &str) -> Result<Value, ApiError> {
        let (da, db) = (self.run_dir(a)?, self.run_dir(b)?);
        let diff = runs::config_diff(
            &runs::config(&self.root, &da),
            &runs::config(&self.root, &db),
        );
        let rows: Vec<_> = diff
            .into_iter()
            .map(|(key, x, y)| json!({"key": key, "a": x, "b": y}))
            .collect();
        Ok(json!({"a": a, "b": b, "diff": rows}))
    }

    pub fn sweep(&mut self, id: &str) -> Result<Value, ApiError> {
        self.scan();
        let dir = self.sweeps.get(id).ok_or_else(|| {
            ApiError::not_found(format!("no sweep {id:?} under the runs directory"))
        })?;
        runs::sweep(&self.root, id, dir).map_err(|e| ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("{e:#}"),
        })
    }
}

/// An API error: its status and a one-line message, as JSON.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn not_found(message: String) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

#[derive(Deserialize)]
struct RunQuery {
    run: Option<String>,
    points: Option<usize>,
    /// Comma-separated curve names.
    keys: Option<String>,
    n: Option<usize>,
    a: Option<String>,
    b: Option<String>,
    id: Option<String>,
}

fn required(v: Option<String>, name: &str) -> Result<String, ApiError> {
    v.ok_or_else(|| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("missing query parameter {name:?}"),
    })
}

type Shared = Arc<Mutex<Dashboard>>;

/// Runs `f` on the dashboard off the async threads (it reads files).
async fn with<F>(state: Shared, f: F) -> Response
where
    F: FnOnce(&mut Dashboard) -> Result<Value, ApiError> + Send + 'static,
{
    let answer = tokio::task::spawn_blocking(move || {
        let mut d = state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut d)
    })
    .await;
    match answer {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: e.to_string(),
        }
        .into_response(),
    }
}

static INDEX: &str = include_str!("page/index.html");
static SCRIPT: &str = include_str!("page/app.js");
static STYLE: &str = include_str!("page/style.css");

fn asset(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

pub fn router(dashboard: Dashboard) -> Router {
    let state: Shared = Arc::new(Mutex::new(dashboard));
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/api/runs",
            get(|State(s): State<Shared>| with(s, |d| Ok(d.overview()))),
        )
        .route(
            "/api/curves",
            get(
                |State(s): State<Shared>, Query(q): Query<RunQuery>| async move {
                    let points = q.points.unwrap_or(DEFAULT_POINTS).clamp(2, runs::CURVE_CAP);
                    let keys = q.keys.map(|k| k.split(',').map(str::to_string).collect());
                    match required(q.run, "run") {
                        Ok(run) => with(s, move |d| d.curves(&run, points, keys)).await,
                        Err(e) => e.into_response(),
                    }
                },
            ),
        )
        .route(
            "/api/samples",
            get(
                |State(s): State<Shared>, Query(q): Query<RunQuery>| async move {
                    let n = q.n.unwrap_or(5).min(100);
                    match required(q.run, "run") {
                        Ok(run) => with(s, move |d| d.samples(&run, n)).await,
                        Err(e) => e.into_response(),
                    }
                },
            ),
        )
        .route(
            "/api/config",
            get(
                |State(s): State<Shared>, Query(q): Query<RunQuery>| async move {
                    match required(q.run, "run") {
                        Ok(run) => with(s, move |d| d.config(&run)).await,
                        Err(e) => e.into_response(),
                    }
                },
            ),
        )
        .route(
            "/api/diff",
            get(
                |State(s): State<Shared>, Query(q): Query<RunQuery>| async move {
                    match (required(q.a, "a"), required(q.b, "b")) {
                        (Ok(a), Ok(b)) => with(s, move |d| d.diff(&a, &b)).await,
                        (Err(e), _) | (_, Err(e)) => e.into_response(),
                    }
                },
            ),
        )
        .route(
            "/api/sweep",
            get(
                |State(s): State<Shared>, Query(q): Query<RunQuery>| async move {
                    match required(q.id, "id") {
                        Ok(id) => with(s, move |d| d.sweep(&id)).await,
                        Err(e) => e.into_response(),
                    }
                },
            ),
        )
        .fallback(|| async {
            ApiError::not_found("not found (the dashboard serves / and /api/…)".into())
        })
        .layer(middleware::from_fn(headers))
        // Curves are arrays of numbers: gzip sends them in about a third of the bytes.
        .layer(tower_http::compression::CompressionLayer::new())
        .with_state(state)
}

/// No script, style or font from anywhere but the dashboard itself.
async fn headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; style-src 'self' 'unsafe-inline'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Serves the dashboard on `addr` until SIGINT/SIGTERM.
pub async fn serve(root: &Path, addr: SocketAddr) -> Result<()> {
    let dashboard = Dashboard::open(root)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{addr}: cannot bind: {e}"))?;
    let bound = listener.local_addr()?;
    if !dashboard.resolved {
        tracing::warn!(
            "{}: no such directory yet; the page shows its runs once it exists",
            root.display()
        );
    }
    if !bound.ip().is_loopback() {
        tracing::warn!(
            "{bound} is reachable from other machines: every run under {} can be read from there",
            root.display()
        );
    }
    println!(
        "dashboard for {} on http://{bound}",
        dashboard.root.display()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    axum::serve(listener, router(dashboard))
        .with_graceful_shutdown(crate::serve::shutdown_signal())
        .await?;
    Ok(())
}
