//! The `lmforge` command line: parses arguments and calls the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lmforge::classify::{Classifier, Input};
use lmforge::data::labelled::{input_of, Fields};
use lmforge::data::prepare::{expand_inputs, prepare};
use lmforge::data::{TextTokenizer, TokenShard, TokenizerSpec};
use lmforge::device::DeviceSpec;
use lmforge::generate::{generate, SamplingOptions};
use lmforge::model::{gguf, hf, Objective};
use lmforge::serve::Served;
use lmforge::train::checkpoint::{self, resolve_model_dir};
use lmforge::train::precision::Precision;
use lmforge::train::{TrainConfig, TrainOptions};
use rand::SeedableRng;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

// glibc's malloc hands freed tensor buffers back to the kernel and faults them in
// again every step: a fifth of a small training step went to page faults
// (BENCHMARKS.md). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "lmforge",
    version,
    about = "Raw text to a trained language model: prepare, train, eval, generate, fill-mask, serve"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Clean text files, train or load a tokenizer, write train/val token shards.
    Prepare(PrepareArgs),
    /// Train a GPT-2, BERT or DistilBERT (with no flags: the Shakespeare preset, then a sample).
    Train(TrainArgs),
    /// Distil a teacher into a student of fewer layers (DistilBERT / DistilGPT2 recipe).
    Distill(DistillArgs),
    /// Hyperparameter search over train runs: grid, random or TPE, with ASHA or median
    /// pruning; resumable, trials in parallel.
    Sweep(SweepArgs),
    /// A live page of the runs and sweeps under a directory: curves, samples, configs.
    Dashboard(DashboardArgs),
    /// Write a GPT-2 as a quantised GGUF that llama.cpp (and lmforge) runs.
    Quantize(QuantizeArgs),
    /// BLEU or chrF of hypotheses against references, equal to sacreBLEU's.
    Score(ScoreArgs),
    /// Loss and perplexity (and masked-token accuracy) of a model over a token file; a
    /// classifier's accuracy, precision / recall / F1, MCC and confusion matrix.
    Eval(EvalArgs),
    /// A classifier's label and probabilities for each input line.
    Predict(PredictArgs),
    /// The most likely tokens at each [MASK] of a text, for a masked LM (BERT).
    FillMask(FillMaskArgs),
    /// Serve a model over HTTP: the OpenAI completions API, or /v1/classify for a classifier.
    Serve(ServeArgs),
    /// Sentence embeddings, one vector a line (BERT mean pooling, GPT-2 last token).
    Embed(EmbedArgs),
    /// Time training steps and KV-cache generation (compare: bench/compare.sh).
    Bench(BenchArgs),
    /// Sample text from a model.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Text files, or directories of .txt files (with --task classify: .jsonl, .csv
    /// or .tsv files of labelled examples).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// char | bpe:VOCAB_SIZE | wordpiece:VOCAB_SIZE | path/to/tokenizer.json | path/to/vocab.txt
    #[arg(long, default_value = "char")]
    tokenizer: String,
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// lm (a token stream for language modelling) | classify (labelled examples).
    #[arg(long, default_value = "lm", value_parser = ["lm", "classify"])]
    task: String,
    /// classify: the field (JSONL) or column (CSV, TSV) holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// classify: the field or column holding the label (a string or an integer).
    #[arg(long, default_value = "label")]
    label_field: String,
    /// classify: a validation file, instead of a stratified split of the inputs.
    #[arg(long, value_name = "FILE")]
    val: Option<PathBuf>,
    /// classify: the seed of the stratified split.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// A TOML preset (default: configs/shakespeare-char.toml, embedded).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Prepared data directory (overrides the preset's `data`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory (overrides the preset's `out_dir`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override any config key: --set lr=3e-4
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the run directory's newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Save a checkpoint and stop after this step (resume later with --resume).
    #[arg(long, value_name = "STEP")]
    stop_at_step: Option<usize>,
    /// Fine-tune a Hugging Face model or run directory (its config wins over the shape keys).
    #[arg(long, value_name = "MODEL_DIR")]
    init_from: Option<PathBuf>,
    /// lm, or classify: train a sequence classifier on `prepare --task classify` data
    /// (a language model given by --init-from gets a fresh head).
    #[arg(long, value_parser = ["lm", "classify"])]
    task: Option<String>,
    /// cpu, cuda or cuda:N: overrides the preset's `device` (also on --resume: a
    /// checkpoint resumes on another device).
    #[arg(long)]
    device: Option<DeviceSpec>,
}

#[derive(clap::Args)]
struct DistillArgs {
    /// The teacher: a model or run directory (GPT-2, BERT or DistilBERT).
    #[arg(long)]
    teacher: PathBuf,
    /// The student's layers, taken evenly from the teacher's (default: half).
    #[arg(long, conflicts_with = "student_config")]
    student_layers: Option<usize>,
    /// A config.json for the student instead.
    #[arg(long, value_name = "FILE")]
    student_config: Option<PathBuf>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(clap::Args)]
struct SweepArgs {
    /// The sweep file (TOML): method, metric, parameters, run_cap, early_terminate.
    #[arg(long)]
    config: PathBuf,
    /// The sweep directory: journal.jsonl, trials/, sweep.md, best.toml, plots.
    #[arg(long)]
    out: PathBuf,
    /// Prepared data directory for every trial.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A train key for every trial, before the trial's own parameters: --set max_steps=500
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Trials at a time (the cores are split between them).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Rerun the best config, and the base config, over this many fresh seeds.
    #[arg(long, default_value_t = 0, value_name = "K")]
    confirm: usize,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// bleu | chrf
    #[arg(long)]
    metric: String,
    /// Hypotheses, one segment a line.
    #[arg(long)]
    hyp: PathBuf,
    /// A reference stream, one segment a line (repeat for several references).
    #[arg(long = "ref", required = true)]
    refs: Vec<PathBuf>,
    /// BLEU's tokenizer: 13a | intl | zh | char | none
    #[arg(long, default_value = "13a")]
    tokenize: String,
    #[arg(long)]
    lowercase: bool,
    /// A score per line (sentence BLEU with effective order).
    #[arg(long)]
    sentence: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct QuantizeArgs {
    /// A GPT-2 model or run directory with a byte-level BPE tokenizer.
    #[arg(long)]
    model: PathBuf,
    /// q8_0 | q4_0 | q4_k
    #[arg(long = "type")]
    qtype: String,
    /// The .gguf file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// A model directory (config.json + model.safetensors) or a run directory.
    #[arg(long)]
    model: PathBuf,
    /// A prepared data directory (its validation split) or a .bin file; for a
    /// classifier, also a labelled .jsonl, .csv or .tsv file.
    #[arg(long, required_unless_present = "prompts")]
    data: Option<PathBuf>,
    /// Causal LM: prompts, one a line, each continued greedily and scored against
    /// `--refs` by `--metric`.
    #[arg(long, requires = "refs")]
    prompts: Option<PathBuf>,
    /// Reference streams for `--prompts`, one segment a line (repeatable).
    #[arg(long)]
    refs: Vec<PathBuf>,
    /// With --prompts: bleu, chrf or both (comma-separated).
    #[arg(long, default_value = "bleu,chrf", value_delimiter = ',')]
    metric: Vec<String>,
    /// With --prompts: BLEU's tokenizer (13a | intl | zh | char | none).
    #[arg(long, default_value = "13a")]
    tokenize: String,
    /// With --prompts: the longest continuation.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Labelled file: the field or column holding the text (JSONL may give `ids`).
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Labelled file: the field or column holding the label.
    #[arg(long, default_value = "label")]
    label_field: String,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PredictArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// A sequence classifier's directory or run directory.
    #[arg(long)]
    model: PathBuf,
    /// One input a line: text (a .txt file, or `-` for stdin), or JSONL objects with a
    /// text field or an `ids` array.
    #[arg(long, conflicts_with_all = ["text", "ids"])]
    input: Option<PathBuf>,
    /// One text to classify.
    #[arg(long, conflicts_with = "ids")]
    text: Option<String>,
    /// One input as the model's token ids: --ids 101,2023,102
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// JSONL: the field holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// One JSON object a line: {"index", "label", "score", "scores": {label: p}}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct FillMaskArgs {
    /// A masked-LM model directory or a run directory.
    #[arg(long)]
    model: PathBuf,
    /// Text with one or more [MASK] tokens ([CLS] and [SEP] are added).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    text: Option<String>,
    /// Token ids, used as given (e.g. 2,17,4,3).
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// The [MASK] id, where the model directory has no tokenizer.
    #[arg(long)]
    mask_id: Option<u32>,
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DashboardArgs {
    /// The directory whose runs (and sweeps), nested ones too, the page shows.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Loopback by default: another address lets other machines read every run.
    #[arg(long, default_value = "127.0.0.1:6006")]
    addr: std::net::SocketAddr,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// A model directory or a run directory (its newest checkpoint).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: std::net::SocketAddr,
    /// Sequences decoded together in one step (8 measured best: BENCHMARKS.md).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 256)]
    max_tokens_limit: usize,
    /// Sequences that may wait for a place before requests get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Name clients use in "model" (default: the --model directory's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Threads for the tensor kernels (RAYON_NUM_THREADS wins when set). One is
    /// fastest for small models: see BENCHMARKS.md.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[command(flatten)]
    embedding: EmbeddingArgs,
}

/// Where the model runs.
#[derive(clap::Args)]
struct DeviceArgs {
    /// cpu, cuda or cuda:N (CUDA needs a `--features cuda` build: README, "GPU").
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

impl DeviceArgs {
    fn open(&self) -> Result<candle_core::Device> {
        self.device.open()
    }
}

/// How /v1/embeddings and `embed` pool a model's last hidden states.
#[derive(clap::Args)]
struct EmbeddingArgs {
    /// mean (BERT's default: over the attention mask) | cls | last (GPT-2's default).
    #[arg(long)]
    pooling: Option<String>,
    /// Scale each vector to unit length.
    #[arg(long)]
    normalize: bool,
}

impl EmbeddingArgs {
    fn load(
        &self,
        model: &std::path::Path,
        device: &candle_core::Device,
    ) -> Result<lmforge::embed::Embedder> {
        let pooling = self
            .pooling
            .as_deref()
            .map(lmforge::embed::Pooling::parse)
            .transpose()?;
        lmforge::embed::Embedder::load(model, (pooling, self.normalize), device)
    }
}

#[derive(clap::Args)]
struct EmbedArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// A BERT, DistilBERT or GPT-2 model or run directory.
    #[arg(long)]
    model: PathBuf,
    /// One input a line: text, or JSONL objects with a `text` field or an `ids` array
    /// (`-`: stdin).
    #[arg(long)]
    input: PathBuf,
    #[command(flatten)]
    embedding: EmbeddingArgs,
    /// JSONL out: {"index", "embedding"}; otherwise one line of space-separated numbers.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// small | medium | bert-small | bert-medium | gpt2 (124M, bf16: the GPU one) | path/to/preset.toml
    #[arg(long, default_value = "small")]
    preset: String,
    /// Timed steps (after the warm-up); the median is reported.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Greedy tokens generated for the generation figure (0: skip it).
    #[arg(long, default_value_t = 256)]
    generate_tokens: usize,
    /// Threads for the tensor kernels (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Override the preset's dtype: f32, bf16 or fp16 (mixed precision).
    #[arg(long)]
    dtype: Option<Precision>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    model: PathBuf,
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// New tokens to generate [default: 200].
    #[arg(long, conflicts_with = "max_length")]
    max_new_tokens: Option<usize>,
    /// Total length, prompt included (Hugging Face's `max_length`).
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    /// Samples to draw (alias: Hugging Face's --num-return-sequences).
    #[arg(long, default_value_t = 1, alias = "num-return-sequences")]
    num_samples: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long)]
    greedy: bool,
    #[arg(long)]
    json: bool,
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h): -1 never returns freed pages to
/// the kernel. With the default (10 ms) every step faulted its buffers in again.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sizes candle's (rayon's) thread pool: call before the first tensor kernel runs.
fn set_kernel_threads(n: usize) {
    std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
}

/// Whether the user chose the thread count through RAYON_NUM_THREADS.
static THREADS_FROM_ENV: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        THREADS_FROM_ENV.store(true, std::sync::atomic::Ordering::Relaxed);
    } else {
        // candle reads the CPU mask from /proc and /sys on every matmul unless this
        // is set (a measured 16 s of system time per 200 small training steps).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        set_kernel_threads(cores);
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options on each use.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = run(Cli::parse().command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The MPI job this process belongs to, when launched by mpirun/srun (feature `mpi`).
/// The ranks of a data-parallel job: NCCL's when training on a GPU under torchrun or
/// mpirun (a `cuda` build), else MPI's (an `mpi` build), else none.
fn collective(
    cfg: &TrainConfig,
) -> Result<Option<std::rc::Rc<dyn lmforge::train::distributed::Collective>>> {
    #[cfg(feature = "cuda")]
    if let DeviceSpec::Cuda(first) = cfg.device {
        let timeout = std::time::Duration::from_secs_f64(cfg.collective_timeout_s);
        if let Some(c) = lmforge::train::nccl::NcclCollective::from_launcher(first, timeout)? {
            return Ok(Some(std::rc::Rc::new(c)));
        }
    }
    mpi_collective(cfg)
}

#[cfg(feature = "mpi")]
fn mpi_collective(
    cfg: &TrainConfig,
) -> Result<Option<std::rc::Rc<dyn lmforge::train::distributed::Collective>>> {
    let timeout = std::time::Duration::from_secs_f64(cfg.collective_timeout_s);
    Ok(
        lmforge::train::distributed::MpiCollective::from_launcher(timeout)?.map(|c| {
            std::rc::Rc::new(c) as std::rc::Rc<dyn lmforge::train::distributed::Collective>
        }),
    )
}

#[cfg(not(feature = "mpi"))]
fn mpi_collective(
    cfg: &TrainConfig,
) -> Result<Option<std::rc::Rc<dyn lmforge::train::distributed::Collective>>> {
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMI_SIZE").is_some()
    {
        anyhow::bail!("launched by an MPI launcher, but this lmforge was built without the `mpi` feature (cargo build --release --features mpi)");
    }
    if std::env::var_os("WORLD_SIZE").is_some_and(|n| n != "1") && cfg.device == DeviceSpec::Cpu {
        anyhow::bail!("launched by torchrun (WORLD_SIZE is set): data parallel over torchrun's variables runs on GPUs over NCCL (device = \"cuda\", a --features cuda build); on CPUs use mpirun with --features mpi");
    }
    Ok(None)
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Prepare(args) => prepare_command(args),
        Command::Train(args) => train_command(args),
        Command::Distill(args) => distill_command(args),
        Command::Quantize(args) => quantize_command(args),
        Command::Score(args) => score_command(args),
        Command::Sweep(args) => sweep_command(args),
        Command::Dashboard(args) => dashboard_command(args),
        Command::Serve(args) => serve_command(args),
        Command::Embed(args) => embed_command(args),
        Command::Bench(args) => bench_command(args),
        Command::Eval(args) => eval_command(args),
        Command::Predict(args) => predict_command(args),
        Command::FillMask(args) => fill_mask_command(args),
        Command::Generate(args) => generate_command(args),
    }
}

/// `lmforge prepare`.
fn prepare_command(
    PrepareArgs {
        input,
        out,
        tokenizer,
        val_fraction,
        task,
        text_field,
        label_field,
        val,
        seed,
    }: PrepareArgs,
) -> Result<()> {
    let spec: TokenizerSpec = tokenizer.parse()?;
    if task == "classify" {
        let fields = lmforge::data::labelled::Fields {
            text: text_field,
            label: label_field,
        };
        let meta = lmforge::data::labelled::prepare_classification(
            &input,
            val.as_deref(),
            &fields,
            &spec,
            &out,
            (val_fraction, seed),
        )?;
        println!(
            "{}: {} training and {} validation examples, labels {:?}, vocabulary {}",
            out.display(),
            meta.train_examples,
            meta.val_examples,
            meta.labels,
            meta.vocab_size
        );
        return Ok(());
    }
    let sources = expand_inputs(&input)?;
    let meta = prepare(&sources, &spec, &out, val_fraction)?;
    println!(
        "{}: {} documents, vocabulary {}, {} train tokens, {} val tokens",
        out.display(),
        meta.documents,
        meta.vocab_size,
        meta.train_tokens,
        meta.val_tokens
    );
    Ok(())
}

/// `lmforge train`.
fn train_command(
    TrainArgs {
        config,
        data,
        out,
        set,
        resume,
        init_from,
        task,
        stop_at_step,
        device,
    }: TrainArgs,
) -> Result<()> {
    let mut cfg = match &config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    if let Some(out) = out {
        cfg.out_dir = out;
    }
    if resume {
        // The run's own settings, then this command's overrides on top.
        let dir = checkpoint::latest(&cfg.out_dir)?.with_context(|| {
            format!(
                "{}: nothing to resume (no checkpoints/latest)",
                cfg.out_dir.display()
            )
        })?;
        let out_dir = std::mem::take(&mut cfg.out_dir);
        cfg = checkpoint::load_state(&dir)?.config;
        cfg.out_dir = out_dir;
    }
    if let Some(data) = data {
        cfg.data = data;
        cfg.corpus = None;
    }
    if init_from.is_some() {
        cfg.init_from = init_from;
    }
    if let Some(task) = task {
        cfg.task = task;
    }
    for s in &set {
        cfg.set(s)?;
    }
    if let Some(device) = device {
        cfg.device = device;
    }
    // First SIGINT/SIGTERM: finish the step, save, exit 0. A second one: exit now
    // (every file is written atomically, so nothing is left half-written).
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let opts = TrainOptions {
        resume,
        stop_at_step,
        stop: Some(stop),
        collective: collective(&cfg)?,
    };
    let summary = lmforge::train::train(&cfg, &opts)?;
    if summary.rank != 0 {
        return Ok(());
    }
    if summary.stopped_early {
        println!(
            "stopped after step {}; checkpoint {}
resume with: lmforge train --out {} --resume",
            summary.steps,
            summary.checkpoint.display(),
            cfg.out_dir.display()
        );
        return Ok(());
    }
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s); val loss {:.4}\nmodel: {}",
        summary.steps,
        summary.wall_s,
        summary.tokens_per_s,
        summary.val_loss,
        summary.checkpoint.display(),
    );
    if let Some(best) = &summary.best {
        println!(
            "best {} {:.4}: {}",
            best.metric,
            best.value,
            best.checkpoint.display()
        );
    }
    let out = cfg.out_dir.display();
    match (&summary.sample, summary.objective) {
        (Some(text), _) => println!("--- sample ---\n{text}"),
        (None, Objective::Classify) => println!(
            "try: lmforge eval --model {out} --data {}\n     lmforge predict --model {out} --input FILE",
            cfg.data.display()
        ),
        (None, _) => println!("try: lmforge fill-mask --model {out} --text \"… [MASK] …\""),
    }
    if summary.skipped_steps > 0 {
        eprintln!(
            "note: {} steps were skipped for a non-finite loss or gradient norm",
            summary.skipped_steps
        );
    }
    Ok(())
}

/// `lmforge score`.
/// `lmforge sweep`.
fn sweep_command(args: SweepArgs) -> Result<()> {
    if args.parallel == 0 {
        anyhow::bail!("--parallel must be at least 1");
    }
    // First SIGINT/SIGTERM: the trials save, the sweep stops (rerun to continue).
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let cores = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let opts = lmforge::sweep::SweepOptions {
        spec_path: args.config,
        out: args.out,
        data: args.data,
        sets: args.set,
        parallel: args.parallel,
        confirm: args.confirm,
        exe: std::env::current_exe().context("cannot find the lmforge executable")?,
        cores,
        stop: Some(stop),
    };
    let sweep = lmforge::sweep::run(&opts)?;
    print!("{}", lmforge::sweep::report::table(&sweep));
    print!("{}", lmforge::sweep::report::summary(&sweep));
    println!(
        "report: {} (plots: metric-vs-*.png)",
        opts.out.join("sweep.md").display()
    );
    Ok(())
}

fn score_command(
    ScoreArgs {
        metric,
        hyp,
        refs,
        tokenize,
        lowercase,
        sentence,
        json,
    }: ScoreArgs,
) -> Result<()> {
    use lmforge::metrics::generation::{corpus_score, sentence_scores, ScoreOptions, Tokenize};
    let chrf = match metric.as_str() {
        "bleu" => false,
        "chrf" => true,
        other => bail!("--metric {other}: expected bleu or chrf"),
    };
    let opts = ScoreOptions {
        chrf,
        tokenize: Tokenize::parse(&tokenize)?,
        lowercase,
    };
    let (hyps, streams) = read_segments(&hyp, &refs)?;
    let scores = match sentence {
        true => sentence_scores(&hyps, &streams, &opts)?,
        false => vec![corpus_score(&hyps, &streams, &opts)?],
    };
    for s in &scores {
        if json {
            println!("{}", serde_json::to_string(s)?);
            continue;
        }
        match (&s.precisions, s.bp, s.sys_len, s.ref_len) {
            (Some(p), Some(bp), Some(sys), Some(reference)) => println!(
                "BLEU = {:.2} {:.1}/{:.1}/{:.1}/{:.1} (BP = {bp:.3} ratio = {:.3} hyp_len = {sys} ref_len = {reference}) {}",
                s.score, p[0], p[1], p[2], p[3],
                if reference > 0 { sys as f64 / reference as f64 } else { 0.0 },
                s.signature
            ),
            _ => println!("{} = {:.2} {}", s.metric, s.score, s.signature),
        }
    }
    Ok(())
}

/// The lines of `first` and of each reference stream, which must have as many.
fn read_segments(
    first: &std::path::Path,
    refs: &[PathBuf],
) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let lines = |p: &std::path::Path| -> Result<Vec<String>> {
        Ok(lmforge::fsutil::read_string(p)?
            .lines()
            .map(str::to_string)
            .collect())
    };
    let head = lines(first)?;
    let mut streams = Vec::new();
    for r in refs {
        let stream = lines(r)?;
        if stream.len() != head.len() {
            bail!(
                "{}: {} lines, but {} has {}",
                r.display(),
                stream.len(),
                first.display(),
                head.len()
            );
        }
        streams.push(stream);
    }
    Ok((head, streams))
}

/// `lmforge quantize`.
fn quantize_command(QuantizeArgs { model, qtype, out }: QuantizeArgs) -> Result<()> {
    let qtype = gguf::QuantType::parse(&qtype)?;
    let dir = resolve_model_dir(&model)?;
    let gpt = hf::load_gpt(&dir, &candle_core::Device::Cpu, "quantize")?;
    let tokenizer = TextTokenizer::from_model_dir(&dir)?
        .with_context(|| format!("{}: no tokenizer to write into the GGUF", dir.display()))?;
    let r = gguf::write(&gpt, &tokenizer, qtype, &out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    println!(
        "{}: {} matrices quantised, {:.1} MB",
        out.display(),
        r.quantized,
        r.bytes as f64 / 1e6
    );
    if !r.kept_f16.is_empty() {
        println!(
            "kept in f16: {} (rows that do not split into the type's blocks)",
            r.kept_f16.join(", ")
        );
    }
    Ok(())
}

/// `lmforge distill`: a training run with a teacher.
fn distill_command(
    DistillArgs {
        teacher,
        student_layers,
        student_config,
        mut train,
    }: DistillArgs,
) -> Result<()> {
    train
        .set
        .insert(0, format!("teacher={}", teacher.display()));
    if let Some(n) = student_layers {
        train.set.insert(1, format!("student_layers={n}"));
    }
    if let Some(path) = student_config {
        train
            .set
            .insert(1, format!("student_config={}", path.display()));
    }
    train_command(train)
}

/// `lmforge serve`.
fn serve_command(
    ServeArgs {
        model,
        addr,
        max_batch,
        max_tokens_limit,
        max_queue,
        model_name,
        threads,
        embedding,
        device,
    }: ServeArgs,
) -> Result<()> {
    if !THREADS_FROM_ENV.load(std::sync::atomic::Ordering::Relaxed) {
        set_kernel_threads(threads);
    }
    let device = device.open()?;
    let objective = match gguf::is_gguf(&model) {
        true => Objective::CausalLm,
        false => hf::load_config(&resolve_model_dir(&model)?)?.objective(),
    };
    // A model directory also serves embeddings; a quantised GGUF only completions.
    let embedder = match gguf::is_gguf(&model) {
        true => None,
        false => Some(embedding.load(&model, &device)?),
    };
    let mut served = Served {
        generator: None,
        classifier: None,
        embedder,
    };
    let context = match objective {
        Objective::Classify => {
            let classifier = Classifier::load(&model, &device)?;
            let context = classifier.model.config().context_len();
            served.classifier = Some(classifier);
            context
        }
        Objective::CausalLm => {
            let (gpt, tokenizer, dir) = load_causal_lm(&model, "serve", &device)?;
            let tokenizer = tokenizer.with_context(|| {
                format!(
                    "{}: no tokenizer (tokenizer.json, vocab.json + merges.txt, or GGUF tokenizer metadata) to serve text with",
                    dir.display()
                )
            })?;
            let context = gpt.config.n_positions;
            served.generator = Some((gpt, tokenizer));
            context
        }
        // A masked LM neither generates nor classifies: embeddings only.
        Objective::MaskedLm => served
            .embedder
            .as_ref()
            .map_or(0, |e| e.model.config().context_len()),
    };
    let name = model_name.unwrap_or_else(|| {
        let canonical = std::fs::canonicalize(&model).unwrap_or(model.clone());
        canonical
            .file_name()
            .map_or("lmforge".into(), |n| n.to_string_lossy().into_owned())
    });
    let opts = lmforge::serve::ServeOptions {
        addr,
        model_name: name,
        max_batch,
        max_queue,
        max_tokens_limit: max_tokens_limit.min(context),
        max_body_bytes: 1 << 20,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(lmforge::serve::serve(served, opts))?;
    Ok(())
}

/// `lmforge dashboard`.
fn dashboard_command(DashboardArgs { runs, addr }: DashboardArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(lmforge::dashboard::serve(&runs, addr))
}

/// `lmforge embed`.
fn embed_command(args: EmbedArgs) -> Result<()> {
    use std::io::Write;
    let embedder = args.embedding.load(&args.model, &args.device.open()?)?;
    // Every input is encoded first, so a bad line fails before any output.
    let sequences = read_inputs(&args.input, "text")?
        .iter()
        .map(|(at, input)| {
            embedder
                .encode(input)
                .map_err(|e| anyhow::anyhow!("{at}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let vectors = embedder.embed(&sequences, lmforge::embed::BATCH)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, v) in vectors.iter().enumerate() {
        if args.json {
            writeln!(out, "{}", serde_json::json!({"index": i, "embedding": v}))?;
        } else {
            let line: Vec<String> = v.iter().map(f32::to_string).collect();
            writeln!(out, "{}", line.join(" "))?;
        }
    }
    Ok(())
}

/// `lmforge bench`.
fn bench_command(
    BenchArgs {
        preset,
        steps,
        warmup,
        generate_tokens,
        threads,
        dtype,
        json,
        device,
    }: BenchArgs,
) -> Result<()> {
    if let Some(n) = threads {
        set_kernel_threads(n);
    }
    let opts = lmforge::bench::BenchOptions {
        steps,
        warmup,
        generate_tokens,
        device: device.device,
        ..Default::default()
    };
    let r = if gguf::is_gguf(std::path::Path::new(&preset)) {
        let r = lmforge::bench::run_gguf(std::path::Path::new(&preset), &opts)?;
        if !json {
            println!(
                "{}: quantised greedy generation {:.0} tokens/s, peak RSS {:.0} MB (a GGUF does not train)",
                r.preset,
                r.generate_tokens_per_s.unwrap_or(f64::NAN),
                r.peak_rss_mb
            );
            return Ok(());
        }
        r
    } else {
        let mut spec = lmforge::bench::BenchSpec::resolve(&preset)?;
        spec.precision = dtype.unwrap_or(spec.precision);
        lmforge::bench::run(&spec, &opts)?
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {:.1} ms/step (min {:.1}, max {:.1}), {:.0} tokens/s, {:.1} GFLOP/s = {:.1}% of a {:.1} GFLOP/s matrix-product ceiling, peak RSS {:.0} MB{}",
            r.preset, r.ms_per_step, r.ms_min, r.ms_max, r.tokens_per_s, r.gflops,
            100.0 * r.mfu, r.ceiling_gflops, r.peak_rss_mb,
            r.generate_tokens_per_s.map_or(String::new(), |g| format!(", generation {g:.0} tokens/s"))
        );
    }
    Ok(())
}

/// `lmforge eval`.
fn eval_command(
    EvalArgs {
        model,
        data,
        prompts,
        refs,
        metric,
        tokenize,
        max_new_tokens,
        text_field,
        label_field,
        json,
        device,
    }: EvalArgs,
) -> Result<()> {
    let device = device.open()?;
    if let Some(prompts) = prompts {
        let metrics = metric
            .iter()
            .map(|m| {
                Ok(lmforge::metrics::generation::ScoreOptions {
                    chrf: match m.as_str() {
                        "bleu" => false,
                        "chrf" => true,
                        other => bail!("--metric {other}: expected bleu or chrf"),
                    },
                    tokenize: lmforge::metrics::generation::Tokenize::parse(&tokenize)?,
                    lowercase: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (gpt, tokenizer, dir) = load_causal_lm(&model, "eval --prompts", &device)?;
        let tokenizer = tokenizer
            .with_context(|| format!("{}: no tokenizer to read the prompts with", dir.display()))?;
        let (prompts, refs) = read_segments(&prompts, &refs)?;
        let (_, scores) = lmforge::eval::continuation_scores(
            &gpt,
            &tokenizer,
            &prompts,
            &refs,
            &metrics,
            max_new_tokens,
        )?;
        for s in scores {
            match json {
                true => println!("{}", serde_json::to_string(&s)?),
                false => println!("{} = {:.2} {}", s.metric, s.score, s.signature),
            }
        }
        return Ok(());
    }
    let data = data.context("--data is needed without --prompts")?;
    if gguf::is_gguf(&model) {
        let (gpt, tokenizer, _) = load_causal_lm(&model, "eval", &device)?;
        return eval_language_model(
            &lmforge::model::Model::Gpt(gpt),
            &model,
            tokenizer,
            &data,
            json,
        );
    }
    let dir = resolve_model_dir(&model)?;
    if hf::load_config(&dir)?.objective() == Objective::Classify {
        let fields = Fields {
            text: text_field,
            label: label_field,
        };
        return eval_classifier(&dir, &data, (&fields, json), &device);
    }
    let m = hf::load(&dir, &device)?;
    let tokenizer = TextTokenizer::from_model_dir(&dir)?;
    eval_language_model(&m, &dir, tokenizer, &data, json)
}

/// `eval` of a language model over a token file (`DIR/val.bin` for a directory).
fn eval_language_model(
    m: &lmforge::model::Model,
    dir: &std::path::Path,
    tokenizer: Option<TextTokenizer>,
    data: &std::path::Path,
    json: bool,
) -> Result<()> {
    let file = if data.is_dir() {
        data.join("val.bin")
    } else {
        data.to_path_buf()
    };
    let shard = TokenShard::open(&file, Some(m.config().vocab_size()))?;
    let r = lmforge::eval::evaluate(m, shard, tokenizer.as_ref(), 8)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        match r.accuracy {
            Some(acc) => println!(
                "{}: masked-token loss {:.4}, perplexity {:.3}, accuracy {:.4}, {} masked tokens",
                file.display(),
                r.loss,
                r.perplexity,
                acc,
                r.tokens
            ),
            None => println!(
                "{}: loss {:.4}, perplexity {:.3}, {} tokens",
                file.display(),
                r.loss,
                r.perplexity,
                r.tokens
            ),
        }
    }
    Ok(())
}

/// A causal LM and its tokenizer (if any) from a model or run directory or a `.gguf`
/// file (its products quantised); `what` names the command in errors.
fn load_causal_lm(
    path: &std::path::Path,
    what: &str,
    device: &candle_core::Device,
) -> Result<(lmforge::model::Gpt, Option<TextTokenizer>, PathBuf)> {
    if gguf::is_gguf(path) {
        let (gpt, tokenizer) = gguf::read(path, device)?;
        return Ok((gpt, tokenizer, path.to_path_buf()));
    }
    let dir = resolve_model_dir(path)?;
    let gpt = hf::load_gpt(&dir, device, what)?;
    let tokenizer = TextTokenizer::from_model_dir(&dir)?;
    Ok((gpt, tokenizer, dir))
}

/// `lmforge generate`.
fn generate_command(
    GenerateArgs {
        model,
        prompt,
        prompt_ids,
        max_new_tokens,
        max_length,
        temperature,
        top_k,
        top_p,
        num_samples,
        seed,
        greedy,
        json,
        device,
    }: GenerateArgs,
) -> Result<()> {
    let (gpt, tokenizer, dir) = load_causal_lm(&model, "generate", &device.open()?)?;
    let ids = match (&prompt, prompt_ids) {
        (_, Some(ids)) => ids,
        (Some(text), None) => {
            let tok = tokenizer.as_ref().with_context(|| {
                format!(
                    "{}: no tokenizer.json (nor vocab.json + merges.txt); use --prompt-ids",
                    dir.display()
                )
            })?;
            let mut ids = tok.encode(text).with_context(|| "--prompt")?;
            if ids.is_empty() {
                ids.push(tok.eot_id());
            }
            ids
        }
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let max_new_tokens = match (max_new_tokens, max_length) {
        (Some(n), _) => n,
        (None, Some(total)) if total > ids.len() => total - ids.len(),
        (None, Some(total)) => bail!(
            "--max-length {total} leaves no room after a {}-token prompt",
            ids.len()
        ),
        (None, None) => 200,
    };
    let opts = SamplingOptions {
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        greedy,
        stop_token: tokenizer.as_ref().map(|t| t.eot_id()),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut samples = Vec::new();
    for _ in 0..num_samples {
        let out = generate(&gpt, &ids, &opts, &mut rng)?;
        let text = match &tokenizer {
            Some(t) => Some(t.decode(&out)?),
            None => None,
        };
        samples.push(serde_json::json!({"text": text, "ids": out}));
    }
    if json {
        println!("{}", serde_json::json!({ "samples": samples }));
    } else {
        for (i, s) in samples.iter().enumerate() {
            if i > 0 {
                println!("---");
            }
            match s["text"].as_str() {
                Some(t) => println!("{t}"),
                None => println!("{}", s["ids"]),
            }
        }
    }
    Ok(())
}

/// `lmforge eval` of a classifier on a classification data directory's `val` split.
fn eval_classifier(
    dir: &std::path::Path,
    data: &std::path::Path,
    (fields, json): (&Fields, bool),
    device: &candle_core::Device,
) -> Result<()> {
    let classifier = Classifier::load(dir, device)?;
    let r = if data.is_dir() {
        // Prepared data: framed with the data's own tokenizer, as in training.
        let tokenizer = TextTokenizer::from_file(&data.join("tokenizer.json"))?;
        let framing = lmforge::eval::framing(&classifier.model, Some(&tokenizer))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        lmforge::eval::evaluate_classifier(&classifier.model, data, "val", &framing, 16)?
    } else {
        classifier.evaluate_file(data, fields)?
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{}: {} examples, loss {:.4}, accuracy {:.4}, macro F1 {:.4}, MCC {:.4}",
        data.display(),
        r.examples,
        r.loss,
        r.report.accuracy,
        r.report.macro_f1,
        r.report.mcc
    );
    for (i, name) in r.labels.iter().enumerate() {
        println!(
            "  {name}: precision {:.4}, recall {:.4}, F1 {:.4}, support {}",
            r.report.precision[i], r.report.recall[i], r.report.f1[i], r.report.support[i]
        );
    }
    println!(
        "  confusion (rows: true, columns: predicted): {:?}",
        r.report.confusion
    );
    Ok(())
}

/// `lmforge predict`.
fn predict_command(
    PredictArgs {
        model,
        input,
        text,
        ids,
        text_field,
        json,
        device,
    }: PredictArgs,
) -> Result<()> {
    let classifier = Classifier::load(&model, &device.open()?)?;
    let inputs: Vec<(String, Input)> = match (input, text, ids) {
        (Some(path), ..) => read_inputs(&path, &text_field)?,
        (None, Some(text), _) => vec![("--text".into(), Input::Text(text))],
        (None, None, Some(ids)) => vec![("--ids".into(), Input::Ids(ids))],
        (None, None, None) => bail!("give --input FILE, --text TEXT or --ids 1,2,3"),
    };
    // Every input is encoded first, so a bad line fails before any output.
    let sequences: Vec<Vec<u32>> = inputs
        .iter()
        .map(|(at, input)| {
            classifier
                .encode(input)
                .map_err(|e| anyhow::anyhow!("{at}: {e}"))
        })
        .collect::<Result<_>>()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    use std::io::Write;
    for (start, chunk) in (0..)
        .step_by(lmforge::classify::BATCH)
        .zip(sequences.chunks(lmforge::classify::BATCH))
    {
        let rows = classifier.probabilities(chunk, lmforge::classify::BATCH)?;
        for (k, p) in rows
            .into_iter()
            .map(|p| classifier.prediction(p))
            .enumerate()
        {
            if json {
                writeln!(out, "{}", p.to_json(start + k))?;
            } else {
                let scores: Vec<String> = p
                    .scores
                    .iter()
                    .map(|(l, v)| format!("{l} {v:.4}"))
                    .collect();
                writeln!(out, "{}\t{:.4}\t{}", p.label, p.score, scores.join(", "))?;
            }
        }
    }
    Ok(out.flush()?)
}

/// Inputs of `predict --input`: a text a line, or JSONL objects (text or `ids`), each
/// with the file and line it came from.
fn read_inputs(path: &std::path::Path, text_field: &str) -> Result<Vec<(String, Input)>> {
    let content = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        lmforge::fsutil::read_string(path)?
    };
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut inputs = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let input = if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{at}: invalid JSON: {e}"))?;
            match input_of(&v, text_field).map_err(|e| anyhow::anyhow!("{at}: {e}"))? {
                (_, Some(ids)) => Input::Ids(ids),
                (text, None) => Input::Text(text),
            }
        } else {
            Input::Text(line.to_string())
        };
        inputs.push((at, input));
    }
    if inputs.is_empty() {
        bail!("{}: no inputs", path.display());
    }
    Ok(inputs)
}

/// `lmforge fill-mask`.
fn fill_mask_command(
    FillMaskArgs {
        model,
        text,
        ids,
        mask_id,
        top_k,
        json,
    }: FillMaskArgs,
) -> Result<()> {
    let dir = resolve_model_dir(&model)?;
    let bert = hf::load(&dir, &candle_core::Device::Cpu)?
        .into_bert("fill-mask")
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let tokenizer = TextTokenizer::from_model_dir(&dir)?;
    let specials = tokenizer.as_ref().and_then(|t| t.bert_specials());
    let mask = match (mask_id, specials) {
        (Some(id), _) => id,
        (None, Some(s)) => s.mask,
        (None, None) => bail!(
            "{}: no BERT tokenizer (vocab.txt or tokenizer.json); give --mask-id",
            dir.display()
        ),
    };
    let ids = match (text.as_deref(), ids) {
        (_, Some(ids)) => ids,
        (Some(text), None) => {
            let (tok, s) = tokenizer.as_ref().zip(specials).with_context(|| {
                format!(
                    "{}: no BERT tokenizer to read --text with; use --ids",
                    dir.display()
                )
            })?;
            let mut ids = vec![s.cls];
            ids.extend(tok.encode(text).context("--text")?);
            ids.push(s.sep);
            ids
        }
        (None, None) => bail!("give --text \"… [MASK] …\" or --ids 2,17,4,3"),
    };
    let name = |id: u32| tokenizer.as_ref().and_then(|t| t.id_to_token(id));
    let fills = lmforge::fill_mask::fill_mask(&bert, &ids, mask, top_k, name)
        .map_err(|e| anyhow::anyhow!("--text/--ids: {e}"))?;
    if json {
        println!("{}", serde_json::json!({ "ids": ids, "masks": fills }));
        return Ok(());
    }
    for f in fills {
        println!("position {}:", f.position);
        for c in f.candidates {
            let token = c.token.unwrap_or_else(|| c.id.to_string());
            println!("  {:>8.4}  {token}  (id {})", c.probability, c.id);
        }
    }
    Ok(())
}
