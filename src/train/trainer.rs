//! The training loop (nanoGPT's, in the open): sample a batch, forward, backward,
//! accumulate, clip, AdamW, log; evaluate and checkpoint on schedule.

use super::checkpoint::{self, TrainerState};
use super::config::Metric;
use super::distill::{self, layer_map, DistillSpec};
use super::distributed::{Collective, SingleProcess};
use super::metrics::{plot_losses, read_series, MetricsLog};
use super::optim::{AdamW, Moments};
use super::parallel::{DataParallel, Gradients};
use super::precision::{LossScaler, Precision};
use super::schedule::lr_at;
use super::status::{Diverged, RunStatus};
use super::TrainConfig;
use crate::data::labelled::{
    class_weights, labels_to_model, read_meta, Framing, LabelledBatcher, LabelledSplit,
};
use crate::data::prepare::ensure_prepared;
use crate::data::{
    Batch, BatchSource, Batcher, MaskedLmBatcher, MaskingSpec, RngState, TextTokenizer, TokenShard,
};
use crate::eval::evaluate_classifier;
use crate::generate::{generate, SamplingOptions};
use crate::model::family::HandWritten;
use crate::model::layers::widened;
use crate::model::{backprop, bert_backprop, hf, Dropout, Gpt, Model, Objective};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::info;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps completed (less than max_steps when stopped early).
    pub steps: usize,
    pub stopped_early: bool,
    pub skipped_steps: usize,
    pub val_loss: f64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub checkpoint: PathBuf,
    pub objective: Objective,
    /// A causal LM's end-of-run sample; `None` for a model that does not generate.
    pub sample: Option<String>,
    /// With `keep_best`: the best evaluation by the run's `metric` and its checkpoint.
    pub best: Option<BestCheckpoint>,
    /// This process's rank (0 when alone); only rank 0 reports.
    pub rank: usize,
}

/// The checkpoint of a run's best evaluation.
#[derive(Debug, Clone)]
pub struct BestCheckpoint {
    pub metric: &'static str,
    pub value: f64,
    pub checkpoint: PathBuf,
}

/// The batches a run of `objective` draws from `shard`, from a sampler seeded `seed`.
pub fn batch_source(
    objective: Objective,
    shard: TokenShard,
    cfg: &TrainConfig,
    tokenizer: &TextTokenizer,
    seed: u64,
) -> Result<BatchSource> {
    Ok(match objective {
        Objective::CausalLm => {
            BatchSource::Causal(Batcher::new(shard, cfg.block_size, cfg.batch_size, seed)?)
        }
        Objective::MaskedLm => {
            let specials = tokenizer.bert_specials().ok_or_else(|| {
                anyhow!("a masked LM needs a BERT tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK]); prepare the data with --tokenizer wordpiece:N")
            })?;
            let spec = MaskingSpec {
                specials,
                vocab_size: tokenizer.vocab_size(),
                probability: cfg.mlm_probability,
            };
            BatchSource::Masked(MaskedLmBatcher::new(
                shard,
                cfg.block_size,
                cfg.batch_size,
                spec,
                seed,
            )?)
        }
        Objective::Classify => {
            bail!("training a sequence classifier is not supported yet (labelled data and `--task classify` come with the classification issue)")
        }
    })
}

/// The student a distillation run starts from: the teacher's config with
/// `student_layers` layers (half, rounded up, when 0) — a DistilBERT for a BERT — or
/// `student_config`, its layers taken evenly from the teacher's ([`layer_map`]).
fn distilled_student(teacher: &Model, cfg: &TrainConfig) -> Result<Model> {
    let t = teacher.config();
    ensure!(
        teacher.objective() != Objective::Classify,
        "distillation is for language models; the teacher is a sequence classifier"
    );
    let student = match &cfg.student_config {
        Some(path) => {
            let student = match path.is_dir() {
                true => hf::load_config(path)?,
                false => hf::parse_config(&crate::fsutil::read(path)?, path)?,
            };
            ensure!(
                student.vocab_size() == t.vocab_size(),
                "{}: the student's vocabulary of {} tokens is not the teacher's {}; distillation compares their distributions token by token",
                path.display(),
                student.vocab_size(),
                t.vocab_size()
            );
            student
        }
        None => {
            let layers = match cfg.student_layers {
                0 => t.layers().div_ceil(2),
                n => n,
            };
            t.with_layers(layers)
        }
    };
    let keep = layer_map(t.layers(), student.layers())?;
    info!(
        "student: {} of {} layers ({keep:?}), {}",
        student.layers(),
        t.layers(),
        student.model_type()
    );
    teacher.distilled_student(&student, &keep, cfg.seed)
}

/// One evaluation's figures: validation loss and the run's `metric` (the same number
/// for a language model).
#[derive(Debug, Clone, Copy)]
struct Validation {
    loss: f64,
    metric: f64,
}

/// Mean loss over `batches` validation batches drawn with a fixed seed, so every
/// evaluation of a run sees the same tokens (and, for a masked LM, the same masks).
fn estimate_val_loss(
    model: &Model,
    val_path: &Path,
    cfg: &TrainConfig,
    tokenizer: &TextTokenizer,
) -> Result<f64> {
    let shard = TokenShard::open(val_path, None)?;
    let objective = model.objective();
    let mut batches = batch_source(objective, shard, cfg, tokenizer, cfg.seed.wrapping_add(3))?;
    let (mut total, mut positions) = (0.0, 0);
    for _ in 0..cfg.eval_batches {
        let (sum, n) = model.score(&batches.next_batch())?;
        total += sum;
        positions += n;
    }
    Ok(total / positions.max(1) as f64)
}

/// Forward and backward over the micro-batches of one optimizer step. Each
/// micro-batch's summed loss is divided by the positions the loss counts in the whole
/// window — over all ranks, whose gradients are summed afterwards — so 2 × 6 rows give
/// the same gradient as 12 rows at once, in one process or two. Gradients are written
/// into `grads` (one buffer per parameter), of the loss times `loss_scale` (fp16's
/// dynamic scaling; 1 otherwise); returns this rank's share of the mean loss, unscaled.
pub fn accumulate_gradients(
    model: &Model,
    batches: Vec<Batch>,
    mut dropout: Option<&mut Dropout>,
    grads: &mut Gradients,
    (teacher, loss_scale): (Option<Teacher>, f64),
) -> Result<f64> {
    let window: usize = batches
        .iter()
        .map(|b| b.loss_positions)
        .sum::<usize>()
        .max(1);
    grads.zero();
    let mut loss = 0.0;
    let params = model.params();
    let p = dropout.as_ref().map_or(0.0, |d| d.p);
    let scale = 1.0 / window as f32;
    for b in batches {
        // Distillation's loss is not the hand-written step's: it goes through autograd.
        let hand_written = match (teacher, &mut *grads) {
            (None, Gradients::Host(host)) => model.hand_written(&b, p).map(|h| (h, host)),
            _ => None,
        };
        if let Some((hand_written, host)) = hand_written {
            let into = Some((host.as_mut_slice(), scale));
            let sum = match hand_written {
                HandWritten::Gpt(m) => {
                    backprop::loss_and_grads(m, &b.inputs, &b.targets, b.batch_size, into)?
                }
                HandWritten::Bert(m, lengths) => {
                    bert_backprop::loss_and_grads(m, &b.inputs, &b.targets, &lengths, into)?.0
                }
            };
            loss += sum / window as f64;
            continue;
        }
        let (sum, _) = match teacher {
            Some((t, spec)) => distill::loss_sum(model, t, &b, dropout.as_deref_mut(), spec)?,
            None => model.loss_sum(&b, dropout.as_deref_mut())?,
        };
        // A 16-bit loss (mixed precision) is summed and scaled in f32; f64 stays f64.
        let micro = (sum.to_dtype(widened(sum.dtype()))? / window as f64)?;
        loss += micro.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = if loss_scale == 1.0 {
            micro.backward()?
        } else {
            (micro * loss_scale)?.backward()?
        };
        for (i, p) in params.iter().enumerate().filter(|(_, p)| p.trainable) {
            // A trainable weight without a gradient means the graph was cut (a fused op
            // without backward): fail loudly instead of training it badly.
            let g = store
                .get(p.tensor())
                .ok_or_else(|| anyhow!("no gradient reached {}", p.name))?;
            grads.add(i, g)?;
        }
    }
    Ok(loss)
}

/// A distillation run's teacher and loss weights.
pub type Teacher<'a> = (&'a Model, &'a DistillSpec);

/// One optimizer step's machinery besides the model and AdamW: the data-parallel
/// collectives, a gradient buffer per parameter and, for fp16, the loss scaler. The
/// trainer and `lmforge bench` both step through it, so what bench times is what
/// training runs.
pub struct Stepper {
    pub dp: DataParallel,
    grads: Gradients,
    pub loss_scaler: Option<LossScaler>,
}

/// What one step did.
pub struct StepOutcome {
    /// Mean loss over the global batch (all ranks).
    pub loss: f64,
    pub grad_norm: f64,
    /// False when the loss or gradient norm was not finite: nothing was updated.
    pub applied: bool,
    /// Not applied only because fp16 gradients overflowed at the current loss scale
    /// (which is halved): a normal event, not a sign of divergence.
    pub overflowed: bool,
    /// Whether any rank was asked to stop.
    pub stop: bool,
}

impl Stepper {
    pub fn new(
        comm: Rc<dyn Collective>,
        (zero_stage, precision): (usize, Precision),
        model: &Model,
        opt: &mut AdamW,
    ) -> Result<Self> {
        let params = model.params();
        Ok(Stepper {
            dp: DataParallel::new(comm, zero_stage, &params, opt)?,
            grads: Gradients::for_params(&params),
            loss_scaler: precision.needs_loss_scaling().then(LossScaler::new),
        })
    }

    /// Runs the steps as a GPU does — gradients, clipping and AdamW in tensor
    /// operations, `opt`'s moments moved into tensors — even on the CPU: the reference
    /// the host fast path is tested against. Single process only.
    pub fn use_tensor_path(&mut self, model: &Model, opt: &mut AdamW) -> Result<()> {
        ensure!(
            self.dp.size() == 1,
            "the tensor path on the CPU is for one process"
        );
        let params = model.params();
        for (slot, p) in opt.moments.iter_mut().zip(&params) {
            if let Some((m, v)) = slot.to_host()? {
                let place =
                    |x: Vec<f32>| Tensor::from_vec(x, p.tensor().shape(), p.tensor().device());
                *slot = Moments::Device {
                    m: place(m)?,
                    v: place(v)?,
                };
            }
        }
        self.grads = Gradients::Device(vec![None; params.len()]);
        Ok(())
    }

    /// Forward and backward over the micro-batches, the ranks' agreement on the loss
    /// (and on `stop`), then clipping and AdamW at `lr` unless the step diverged.
    pub fn step(
        &mut self,
        model: &Model,
        opt: &mut AdamW,
        batches: Vec<Batch>,
        (dropout, teacher): (Option<&mut Dropout>, Option<Teacher>),
        (grad_clip, lr): (f64, f64),
        stop: bool,
    ) -> Result<StepOutcome> {
        let loss_scale = self.loss_scaler.map_or(1.0, |s| s.scale);
        let local = accumulate_gradients(
            model,
            batches,
            dropout,
            &mut self.grads,
            (teacher, loss_scale),
        )?;
        if loss_scale != 1.0 {
            self.grads.scale(1.0 / loss_scale)?;
        }
        let (loss, stop) = self.dp.agree(local, stop)?;
        let params = model.params();
        let (grad_norm, applied) = self.dp.update(
            &params,
            opt,
            &mut self.grads,
            grad_clip,
            lr,
            loss.is_finite(),
        )?;
        // A finite loss with overflowing gradients is the scale's fault while it is
        // above 1; below that the gradients themselves are not finite.
        let overflowed = !applied && loss.is_finite() && loss_scale > 1.0;
        if let Some(scaler) = self.loss_scaler.as_mut() {
            scaler.update(!applied);
        }
        Ok(StepOutcome {
            loss,
            grad_norm,
            applied,
            overflowed,
            stop,
        })
    }
}

/// How a run starts and when it stops early.
#[derive(Default, Clone)]
pub struct TrainOptions {
    /// Continue from the run directory's newest checkpoint.
    pub resume: bool,
    /// Save and stop after this step (for time-sliced jobs); resume later.
    pub stop_at_step: Option<usize>,
    /// Set by a signal handler: finish the current step, save, stop.
    pub stop: Option<Arc<AtomicBool>>,
    /// The ranks of a data-parallel job (default: this process alone).
    pub collective: Option<Rc<dyn Collective>>,
}

/// Everything a run holds between steps; a checkpoint stores all of it.
struct Session {
    cfg: TrainConfig,
    run_dir: PathBuf,
    val_path: PathBuf,
    tokenizer: TextTokenizer,
    model: Model,
    opt: AdamW,
    loader: BatchSource,
    dropout: Dropout,
    /// A classifier's framing of its examples (`None` for a language model).
    framing: Option<Framing>,
    /// Distillation: the teacher and the loss's weights.
    teacher: Option<(Model, DistillSpec)>,
    start: usize,
    /// The best value of `cfg.metric` so far, and evaluations since it improved.
    best: Option<f64>,
    best_step: Option<usize>,
    evals_since_best: usize,
    skipped: usize,
    resumed: bool,
    world_size: usize,
    /// fp16's loss scale as of the last step (restored on resume).
    loss_scaler: Option<LossScaler>,
}

impl Session {
    /// Builds the run: data (prepared if needed), tokenizer, model (fresh, fine-tuned
    /// from `init_from`, or resumed), optimizer and sampler state.
    fn open(cfg: &TrainConfig, resume: bool, comm: &dyn Collective) -> Result<Self> {
        cfg.validate()?;
        let mut cfg = cfg.clone();
        let device = match (comm.device(), comm.size()) {
            (Some(gpu), _) => gpu.clone(),
            (None, 1) => cfg.device.open()?,
            (None, _) => cfg
                .device
                .for_local_rank(super::rendezvous::local_rank())
                .open()?,
        };
        let run_dir = cfg.out_dir.clone();
        let resume_from = if resume {
            checkpoint::latest(&run_dir)?
        } else {
            None
        };
        if resume && resume_from.is_none() {
            bail!(
                "{}: nothing to resume (no checkpoints/latest)",
                run_dir.display()
            );
        }
        // Where the weights (and possibly the tokenizer) come from.
        let init_from = cfg
            .init_from
            .as_deref()
            .map(checkpoint::resolve_model_dir)
            .transpose()?;
        let teacher_dir = cfg
            .teacher
            .as_deref()
            .map(checkpoint::resolve_model_dir)
            .transpose()?;
        let teacher = teacher_dir
            .as_ref()
            .map(|dir| hf::load(dir, &device))
            .transpose()?;
        let source = resume_from.clone().or(init_from).or(teacher_dir);
        let pretrained = match (&resume_from, &teacher) {
            // A distillation student starts as the teacher's chosen layers.
            (None, Some(t)) => Some(distilled_student(t, &cfg)?),
            _ => source
                .as_ref()
                .map(|dir| hf::load(dir, &device))
                .transpose()?,
        };

        // Every rank must run the same configuration.
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            serde_json::to_string(&cfg)?.hash(&mut h);
            h.finish()
        };
        let hashes = comm.all_gather_u64(hash)?;
        if let Some(r) = hashes.iter().position(|&h| h != hashes[0]) {
            bail!("rank {r} was started with a different configuration than rank 0 (same --config, --set and --resume on every rank)");
        }
        // Rank 0 prepares missing language-model data; the others wait, then read it.
        // Labelled data is prepared beforehand (`prepare --task classify`).
        let labelled = if cfg.is_classification() {
            Some(read_meta(&cfg.data)?)
        } else {
            None
        };
        let prepare = || {
            ensure_prepared(
                &cfg.data,
                cfg.corpus.as_deref(),
                &cfg.tokenizer,
                cfg.val_fraction,
            )
        };
        let data_vocab = match &labelled {
            Some(meta) => meta.vocab_size,
            None if comm.rank() == 0 => {
                let meta = prepare();
                comm.barrier()?;
                meta?.vocab_size
            }
            None => {
                comm.barrier()?;
                prepare()?.vocab_size
            }
        };
        let data_dir = cfg.data.clone();
        let data_tokenizer = TextTokenizer::from_file(&data_dir.join("tokenizer.json"))?;
        let tokenizer = match source.as_ref().map(|dir| TextTokenizer::from_model_dir(dir)).transpose()?.flatten() {
            Some(t) if t.vocab_size() != data_tokenizer.vocab_size() => bail!(
                "{}: data was tokenized with a {}-token tokenizer, but {} has a {}-token one; prepare it with --tokenizer MODEL_DIR/tokenizer.json",
                data_dir.display(),
                data_tokenizer.vocab_size(),
                source.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
                t.vocab_size()
            ),
            Some(t) => t,
            None => data_tokenizer,
        };
        let mut model_cfg = match &pretrained {
            Some(m) => {
                let mut c = m.config();
                cfg.adopt_shape(&c);
                c.set_dropout(cfg.dropout as f32);
                c
            }
            None => cfg.model_config(
                tokenizer.vocab_size(),
                tokenizer.bert_specials().map(|s| s.pad),
            )?,
        };
        let pretrained_is_classifier = model_cfg.objective() == Objective::Classify;
        match &labelled {
            Some(meta) if !pretrained_is_classifier => {
                model_cfg.set_classifier(meta.labels.clone(), tokenizer.eot_id())
            }
            None if pretrained_is_classifier => {
                bail!(
                "{}: a sequence classifier; fine-tune it with task = \"classify\" on labelled data",
                source.as_ref().map(|d| d.display().to_string()).unwrap_or_default()
            )
            }
            _ => {}
        }
        let vocab = model_cfg.vocab_size();
        if cfg.block_size > model_cfg.context_len() {
            bail!(
                "block_size {} is larger than the model's context of {} positions",
                cfg.block_size,
                model_cfg.context_len()
            );
        }
        if data_vocab > vocab {
            bail!(
                "{}: vocabulary of {} tokens does not fit the model's {}",
                data_dir.display(),
                data_vocab,
                vocab
            );
        }
        let mut model = match pretrained {
            Some(m) if m.objective() == model_cfg.objective() => m,
            // A language model's body under a classifier's fresh head.
            Some(m) => m.with_new_head(&model_cfg, cfg.seed)?,
            None => Model::init(&model_cfg, cfg.seed, &device)?,
        };
        model.set_dropout(cfg.dropout as f32);
        model.set_compute_dtype(cfg.dtype.compute_dtype());

        let (mut loader, val_path, framing) = match &labelled {
            Some(meta) => {
                let mut framing = crate::eval::framing(&model, Some(&tokenizer))?;
                framing.max_len = framing.max_len.min(cfg.block_size);
                let train = LabelledSplit::open(&data_dir, "train", meta.labels.len())?;
                LabelledSplit::open(&data_dir, "val", meta.labels.len())?;
                let meta_path = data_dir.join("meta.json");
                let to_model = labels_to_model(&meta.labels, model.labels(), &meta_path)?;
                let weights =
                    class_weights(&cfg.class_weights, &train.label_counts(meta.labels.len()))?;
                let global = cfg.batch_size * cfg.grad_accum * comm.size();
                cfg.resolve_epochs(train.len(), global);
                let batcher = LabelledBatcher::new(
                    train,
                    framing,
                    cfg.batch_size,
                    (to_model, weights),
                    cfg.seed.wrapping_add(1),
                )?;
                (BatchSource::Labelled(batcher), meta_path, Some(framing))
            }
            None => {
                let train_shard = TokenShard::open(&data_dir.join("train.bin"), Some(vocab))?;
                let val_path = data_dir.join("val.bin");
                TokenShard::open(&val_path, Some(vocab))?;
                cfg.resolve_epochs(train_shard.len(), cfg.tokens_per_step() * comm.size());
                let loader = batch_source(
                    model_cfg.objective(),
                    train_shard,
                    &cfg,
                    &tokenizer,
                    cfg.seed.wrapping_add(1),
                )?;
                (loader, val_path, None)
            }
        };

        if comm.rank() == 0 {
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("{}: cannot create", run_dir.display()))?;
            checkpoint::remove_stale_temporaries(&run_dir)?;
        }
        let adam_cfg = cfg.adamw();
        let mut dropout = Dropout {
            p: cfg.dropout as f32,
            // Each rank draws its own dropout masks (rank 0's stream is the single-process one).
            rng: ChaCha8Rng::seed_from_u64(
                cfg.seed
                    .wrapping_add(2)
                    .wrapping_add(7919 * comm.rank() as u64),
            ),
        };
        let mut opt = AdamW::new(adam_cfg, &model.params())?;
        let (mut start, mut best, mut best_step, mut evals_since_best, mut skipped) =
            (0, None, None, 0, 0);
        let mut loss_scaler = None;
        match &resume_from {
            Some(dir) => {
                let state = checkpoint::load_state(dir)?;
                let (was, now) = (
                    state.config.batch_size * state.world_size,
                    cfg.batch_size * comm.size(),
                );
                if was != now {
                    bail!(
                        "{}: the checkpoint's global batch is {was} rows (batch_size {} × {} ranks), this run's is {now}; set batch_size so that batch_size × ranks = {was}",
                        dir.display(), state.config.batch_size, state.world_size
                    );
                }
                checkpoint::load_optimizer(
                    &dir.join(checkpoint::OPTIMIZER_FILE),
                    &model.params(),
                    &mut opt,
                    state.adam_t,
                )?;
                loader
                    .restore(&state.loader)
                    .map_err(|e| anyhow!("{}: {e}", dir.display()))?;
                dropout.rng = state.dropout.to_rng();
                (start, best, best_step, evals_since_best, skipped) = (
                    state.step,
                    state.best_metric,
                    state.best_step,
                    state.evals_since_best,
                    state.skipped_steps,
                );
                loss_scaler = state.loss_scaler;
                info!("resuming {} at step {start}", dir.display());
            }
            None => {
                if let Some(dir) = &cfg.init_from {
                    info!("fine-tuning {}", dir.display())
                }
            }
        }
        let distillation = cfg.distillation();
        Ok(Session {
            cfg,
            run_dir,
            val_path,
            tokenizer,
            model,
            opt,
            loader,
            dropout,
            framing,
            teacher: teacher.zip(distillation),
            start,
            best,
            best_step,
            evals_since_best,
            skipped,
            resumed: resume_from.is_some(),
            world_size: comm.size(),
            loss_scaler,
        })
    }

    /// Writes a checkpoint of the current state after `step` updates.
    fn save(&self, step: usize, val: Option<Validation>) -> Result<PathBuf> {
        let state = TrainerState {
            step,
            adam_t: self.opt.t,
            loader: self.loader.state(),
            dropout: RngState::of(&self.dropout.rng),
            best_metric: self.best,
            best_step: self.best_step,
            evals_since_best: self.evals_since_best,
            val_loss: val.map(|v| v.loss),
            val_metric: val.map(|v| v.metric),
            skipped_steps: self.skipped,
            world_size: self.world_size,
            config: self.cfg.clone(),
            loss_scaler: self.loss_scaler,
        };
        checkpoint::save(
            &self.run_dir,
            &self.model,
            &self.opt,
            &self.tokenizer,
            &state,
        )
    }
}

/// Runs training as `cfg` says (see [`TrainOptions`] for resuming, stopping early and
/// data-parallel ranks). Under several ranks, rank 0 alone logs, evaluates and writes.
/// The run's `run.json` says it is running while it does and how it ended afterwards.
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> Result<RunSummary> {
    let mut status = None;
    let result = train_run(cfg, opts, &mut status);
    if let Some((run_dir, status)) = status {
        let ended = status.end(&run_dir, result.as_ref().map(|s| s.stopped_early));
        // A failed run's own error matters more than a failure to record it.
        if result.is_ok() {
            ended?;
        }
    }
    result
}

fn train_run(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    status: &mut Option<(PathBuf, RunStatus)>,
) -> Result<RunSummary> {
    let comm: Rc<dyn Collective> = opts
        .collective
        .clone()
        .unwrap_or_else(|| Rc::new(SingleProcess));
    let mut s = Session::open(cfg, opts.resume, comm.as_ref())?;
    let cfg = s.cfg.clone();
    let mut stepper = Stepper::new(
        Rc::clone(&comm),
        (cfg.zero_stage, cfg.dtype),
        &s.model,
        &mut s.opt,
    )?;
    if let (Some(scaler), Some(saved)) = (stepper.loss_scaler.as_mut(), s.loss_scaler) {
        *scaler = saved;
    }
    let dp = &stepper.dp;
    dp.broadcast_weights(&s.model.params())?;
    let (rank, world) = (dp.rank(), dp.size());
    let lead = rank == 0;
    let params_count: usize = s
        .model
        .params()
        .iter()
        .map(|p| p.tensor().elem_count())
        .sum();
    let flops_per_token = s.model.config().flops_per_token(cfg.block_size);
    if lead {
        info!(
            "model: {} {} layers, {} heads, {} dims, context {}, vocab {}; {:.2}M parameters; {:.1} MFLOP/token; MFU against a peak of {} GFLOP/s",
            cfg.model_type, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, s.model.config().vocab_size(),
            params_count as f64 / 1e6, flops_per_token / 1e6, cfg.peak_gflops
        );
        if world > 1 {
            info!(
                "{world} ranks, global batch {} rows; ZeRO stage {}: {:.1} MB of AdamW state per rank",
                cfg.batch_size * world * cfg.grad_accum, cfg.zero_stage, dp.optimizer_floats(&s.opt) as f64 * 4e-6
            );
        }
    }
    if lead {
        *status = Some((
            s.run_dir.clone(),
            RunStatus::begin(&s.run_dir, &cfg, s.start)?,
        ));
        let runs = s.run_dir.parent().filter(|p| !p.as_os_str().is_empty());
        info!(
            "watch it live: lmforge dashboard --runs {}",
            runs.map_or(".".into(), |p| p.display().to_string())
        );
    }
    let metrics_path = s.run_dir.join("metrics.jsonl");
    let mut log = if lead {
        let log = MetricsLog::open(&metrics_path, s.resumed.then_some(s.start))?;
        Some(match cfg.tensorboard {
            true => log.with_tensorboard(&s.run_dir)?,
            false => log,
        })
    } else {
        None
    };
    // A causal LM's sample at each evaluation, kept (like metrics.jsonl) through the
    // step a resumed run starts from.
    let mut samples = match (&s.model, lead, cfg.sample_tokens) {
        (Model::Gpt(_), true, 1..) if s.model.objective() == Objective::CausalLm => {
            Some(MetricsLog::open(
                &s.run_dir.join("samples.jsonl"),
                s.resumed.then_some(s.start),
            )?)
        }
        _ => None,
    };
    let bar = if lead {
        ProgressBar::new(cfg.max_steps as u64).with_position(s.start as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .map_err(|e| anyhow!("{e}"))?,
    );
    let run_start = Instant::now();
    // Wall time since the run first started, going on from the log after a resume.
    let clock_offset = log.as_ref().map_or(0.0, |l| l.elapsed_before);
    let elapsed = || clock_offset + run_start.elapsed().as_secs_f64();
    let metric = cfg.metric()?;
    let evaluate = |s: &Session,
                    step: usize,
                    train_loss: Option<f64>,
                    tok_s: f64,
                    log: &mut MetricsLog,
                    samples: &mut Option<MetricsLog>|
     -> Result<Validation> {
        let mut record = json!({"step": step, "elapsed_s": elapsed()});
        let v = match &s.framing {
            // A classifier is judged on the whole validation split, as HF's evaluate().
            Some(framing) => {
                let e = evaluate_classifier(&s.model, &cfg.data, "val", framing, cfg.batch_size)?;
                let r = &e.report;
                for (key, value) in [
                    ("val_accuracy", r.accuracy),
                    ("val_f1_macro", r.macro_f1),
                    ("val_precision_macro", r.macro_precision),
                    ("val_recall_macro", r.macro_recall),
                    ("val_mcc", r.mcc),
                ] {
                    record[key] = json!(value);
                }
                Validation {
                    loss: e.loss,
                    metric: metric.of(e.loss, r),
                }
            }
            None => {
                let loss = estimate_val_loss(&s.model, &s.val_path, &cfg, &s.tokenizer)?;
                Validation { loss, metric: loss }
            }
        };
        record["val_loss"] = json!(v.loss);
        log.write(&record)?;
        let judged = match metric {
            Metric::ValLoss => String::new(),
            m => format!(", val {} {:.4}", m.name(), v.metric),
        };
        bar.suspend(|| match train_loss {
            Some(l) => info!(
                "step {step}: train loss {l:.4}, val loss {:.4}{judged}, {tok_s:.0} tokens/s",
                v.loss
            ),
            None => info!("step {step}: val loss {:.4}{judged}", v.loss),
        });
        let (train, val) = read_series(&metrics_path)?;
        plot_losses(&s.run_dir.join("loss.png"), &train, &val)?;
        if let (Some(out), Model::Gpt(gpt)) = (samples.as_mut(), &s.model) {
            let text = sample_text(gpt, &s.tokenizer, cfg.sample_tokens, cfg.seed)?;
            out.write(&json!({"step": step, "text": text}))?;
        }
        Ok(v)
    };
    let mut val_loss = f64::NAN;
    if let (Some(log), 0, true) = (log.as_mut(), s.start, cfg.eval_every > 0) {
        val_loss = evaluate(&s, 0, None, 0.0, log, &mut samples)?.loss;
    }
    // A checkpoint needs the full optimizer state: every rank joins the gather, rank 0 writes.
    let save = |s: &mut Session,
                dp: &DataParallel,
                step: usize,
                val: Option<Validation>|
     -> Result<Option<PathBuf>> {
        dp.gather_state(&s.model.params(), &mut s.opt)?;
        let path = if lead { Some(s.save(step, val)?) } else { None };
        dp.release_state(&mut s.opt);
        Ok(path)
    };

    let (mut rate, mut tokens_seen, mut bad_streak) = (0.0, 0usize, 0usize);
    let mut last_saved: Option<(usize, Option<PathBuf>)> = None;
    let (mut stopped_at, mut out_of_patience) = (None, false);
    for step in s.start..cfg.max_steps {
        let t0 = Instant::now();
        let lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps);
        let batches: Vec<Batch> = (0..cfg.grad_accum)
            .map(|_| s.loader.next_batch_of(rank, world))
            .collect();
        // Positions computed (a classifier's batches are as long as their longest example).
        let tokens_per_step = batches.iter().map(|b| b.inputs.len()).sum::<usize>() * world;
        let interrupted = opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        // Divergence guard: a non-finite step changes nothing but the counters.
        let StepOutcome {
            loss,
            grad_norm,
            applied: finite,
            overflowed,
            stop: interrupted,
        } = stepper.step(
            &s.model,
            &mut s.opt,
            batches,
            (
                Some(&mut s.dropout),
                s.teacher.as_ref().map(|(m, spec)| (m, spec)),
            ),
            (cfg.grad_clip, lr),
            interrupted,
        )?;
        s.loss_scaler = stepper.loss_scaler;
        if finite {
            bad_streak = 0;
        } else {
            s.skipped += 1;
            bad_streak += usize::from(!overflowed);
        }

        let done = step + 1;
        let dt = t0.elapsed().as_secs_f64();
        tokens_seen += tokens_per_step;
        let tok_s = tokens_per_step as f64 / dt;
        rate = if rate == 0.0 {
            tok_s
        } else {
            0.9 * rate + 0.1 * tok_s
        };
        let mfu = flops_per_token * tok_s / (cfg.peak_gflops * 1e9);
        if let Some(log) = log.as_mut() {
            let mut line = json!({
                "step": done, "loss": if finite { json!(loss) } else { json!(null) }, "lr": lr,
                "grad_norm": if finite { json!(grad_norm) } else { json!(null) }, "skipped": !finite,
                "skipped_total": s.skipped, "tokens_per_s": tok_s, "ms_per_step": dt * 1e3, "mfu": mfu, "tokens": tokens_seen,
                "elapsed_s": elapsed(),
            });
            if let Some(scaler) = s.loss_scaler {
                line["loss_scale"] = json!(scaler.scale);
            }
            log.write(&line)?;
        }
        if bad_streak >= cfg.max_bad_steps {
            bar.finish_and_clear();
            let kept = checkpoint::latest(&s.run_dir)?
                .map_or("none yet".to_string(), |p| p.display().to_string());
            return Err(Diverged(format!(
                "stopped at step {done}: {bad_streak} consecutive steps had a non-finite loss or gradient norm (lower lr or check the data); last good checkpoint: {kept}"
            ))
            .into());
        }
        bar.set_position(done as u64);
        if done % cfg.log_every.max(1) == 0 || done == cfg.max_steps {
            bar.set_message(format!(
                "loss {loss:.4} | {:.1}k tok/s | MFU {:.1}%",
                rate / 1e3,
                100.0 * mfu
            ));
        }
        let mut step_val = None;
        let evaluating =
            (cfg.eval_every > 0 && done % cfg.eval_every == 0) || done == cfg.max_steps;
        let mut new_best = false;
        if let (Some(log), true) = (log.as_mut(), evaluating) {
            let v = evaluate(&s, done, Some(loss), rate, log, &mut samples)?;
            val_loss = v.loss;
            if v.metric.is_finite() && s.best.is_none_or(|b| metric.better(v.metric, b)) {
                (s.best, s.best_step, s.evals_since_best) = (Some(v.metric), Some(done), 0);
                new_best = true;
            } else {
                s.evals_since_best += 1;
            }
            out_of_patience = cfg.patience > 0 && s.evals_since_best >= cfg.patience;
            if out_of_patience {
                bar.suspend(|| info!(
                    "stopping early at step {done}: {} has not improved for {} evaluations (best {:.4})",
                    metric.name(), cfg.patience, s.best.unwrap_or(f64::NAN)
                ));
            }
            step_val = Some(v);
        }
        // Rank 0 alone evaluates; every rank learns whether it ran out of patience and
        // whether the evaluation was a new best (whose checkpoint keep_best saves).
        if evaluating && (cfg.patience > 0 || cfg.keep_best) && world > 1 {
            let verdict = comm.all_gather_u64(out_of_patience as u64 | (new_best as u64) << 1)?[0];
            (out_of_patience, new_best) = (verdict & 1 != 0, verdict & 2 != 0);
        }
        let stop_here = interrupted || out_of_patience || opts.stop_at_step == Some(done);
        let scheduled = (cfg.save_every > 0 && done % cfg.save_every == 0)
            || done == cfg.max_steps
            || (cfg.keep_best && new_best);
        // During a run of skipped steps the newest checkpoint stays the last good one.
        if (scheduled && bad_streak == 0) || stop_here {
            last_saved = Some((done, save(&mut s, &stepper.dp, done, step_val)?));
        }
        if stop_here && done < cfg.max_steps {
            stopped_at = Some(done);
            break;
        }
    }
    bar.finish_and_clear();
    let end = stopped_at.unwrap_or(cfg.max_steps.max(s.start));
    let checkpoint = match last_saved {
        Some((step, path)) if step == end => path,
        _ => save(&mut s, &stepper.dp, end, None)?,
    };
    let wall_s = run_start.elapsed().as_secs_f64();
    let objective = s.model.objective();
    let sample = match (&s.model, stopped_at, lead) {
        (Model::Gpt(gpt), None, true) if objective == Objective::CausalLm => {
            Some(sample_text(gpt, &s.tokenizer, cfg.sample_tokens, cfg.seed)?)
        }
        (Model::Gpt(_), ..) if objective == Objective::CausalLm => Some(String::new()),
        // A masked LM or a classifier does not generate.
        _ => None,
    };
    let best = match (s.best, s.best_step) {
        (Some(value), Some(step)) if cfg.keep_best => Some(BestCheckpoint {
            metric: metric.name(),
            value,
            checkpoint: checkpoint::checkpoints_dir(&s.run_dir).join(checkpoint::step_name(step)),
        }),
        _ => None,
    };
    Ok(RunSummary {
        steps: end,
        stopped_early: stopped_at.is_some() && !out_of_patience,
        skipped_steps: s.skipped,
        val_loss,
        wall_s,
        tokens_per_s: tokens_seen as f64 / wall_s,
        checkpoint: checkpoint.unwrap_or_default(),
        objective,
        sample,
        best,
        rank,
    })
}

/// A sample that starts a fresh document (after end-of-text), nanoGPT's sampling
/// settings: temperature 0.8, top-k 200.
fn sample_text(model: &Gpt, tokenizer: &TextTokenizer, tokens: usize, seed: u64) -> Result<String> {
    let opts = SamplingOptions {
        max_new_tokens: tokens,
        temperature: 0.8,
        top_k: Some(200),
        top_p: None,
        greedy: false,
        stop_token: Some(tokenizer.eot_id()),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids = generate(model, &[tokenizer.eot_id()], &opts, &mut rng)?;
    let new: Vec<u32> = ids[1..]
        .iter()
        .copied()
        .filter(|&t| t != tokenizer.eot_id())
        .collect();
    let text = tokenizer.decode(&new)?;
    Ok(text.chars().take(tokens).collect())
}
