//! Metrics of generated text, equal to sacreBLEU 2.x's: BLEU (corpus, or sentence
//! with effective order; `exp` smoothing; the closest reference length, the shorter of
//! ties) over the `13a`, `intl`, `zh`, `char` or `none` tokenization, and chrF
//! (character 6-grams, β = 2, whitespace removed, statistics of the best reference by
//! F-score, averaged over the orders that have both counts).
//! `tests/generation_metrics.rs` holds them to sacreBLEU's stored outputs.

use anyhow::{bail, ensure, Result};
use regex::Regex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::OnceLock;

const MAX_ORDER: usize = 4;
const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;

/// sacreBLEU's tokenizers for BLEU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenize {
    Thirteen,
    Intl,
    Zh,
    Char,
    None,
}

impl Tokenize {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "13a" => Tokenize::Thirteen,
            "intl" => Tokenize::Intl,
            "zh" => Tokenize::Zh,
            "char" => Tokenize::Char,
            "none" => Tokenize::None,
            other => bail!("--tokenize {other}: expected 13a, intl, zh, char or none"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Tokenize::Thirteen => "13a",
            Tokenize::Intl => "intl",
            Tokenize::Zh => "zh",
            Tokenize::Char => "char",
            Tokenize::None => "none",
        }
    }

    /// The tokenized segment, tokens separated by single spaces.
    pub fn apply(self, line: &str) -> String {
        match self {
            Tokenize::None => line.to_string(),
            Tokenize::Char => line.chars().map(String::from).collect::<Vec<_>>().join(" "),
            Tokenize::Thirteen => {
                let mut line = line
                    .replace("<skipped>", "")
                    .replace("-\n", "")
                    .replace('\n', " ");
                if line.contains('&') {
                    line = line
                        .replace("&quot;", "\"")
                        .replace("&amp;", "&")
                        .replace("&lt;", "<")
                        .replace("&gt;", ">");
                }
                mteval_regexes(&format!(" {line} "))
            }
            Tokenize::Zh => {
                let mut spaced = String::new();
                for c in line.trim().chars() {
                    if is_chinese(c) {
                        spaced.push(' ');
                        spaced.push(c);
                        spaced.push(' ');
                    } else {
                        spaced.push(c);
                    }
                }
                mteval_regexes(&spaced)
            }
            Tokenize::Intl => {
                static RULES: OnceLock<[(Regex, &str); 3]> = OnceLock::new();
                let rules = RULES.get_or_init(|| {
                    [
                        (Regex::new(r"(\P{N})(\p{P})").unwrap(), "$1 $2 "),
                        (Regex::new(r"(\p{P})(\P{N})").unwrap(), " $1 $2"),
                        (Regex::new(r"(\p{S})").unwrap(), " $1 "),
                    ]
                });
                join_words(&apply_rules(line, rules))
            }
        }
    }
}

fn apply_rules(line: &str, rules: &[(Regex, &str)]) -> String {
    let mut line = line.to_string();
    for (re, replacement) in rules {
        line = re.replace_all(&line, *replacement).into_owned();
    }
    line
}

/// Words separated by single spaces (Python's `' '.join(s.split())`).
fn join_words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// mteval-v13a's punctuation rules, as sacreBLEU's `TokenizerRegexp` applies them.
fn mteval_regexes(line: &str) -> String {
    static RULES: OnceLock<[(Regex, &str); 4]> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            // ASCII punctuation and symbols except ' and - (and the period and
            // comma, below): { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
            (
                Regex::new(r"([\x7B-\x7E\x5B-\x60\x20-\x26\x28-\x2B\x3A-\x40\x2F])").unwrap(),
                " $1 ",
            ),
            (Regex::new(r"([^0-9])([.,])").unwrap(), "$1 $2 "),
            (Regex::new(r"([.,])([^0-9])").unwrap(), " $1 $2"),
            (Regex::new(r"([0-9])(-)").unwrap(), "$1 $2 "),
        ]
    });
    join_words(&apply_rules(line, rules))
}

/// sacreBLEU's `zh` ranges, as its comparisons of one character against two-character
/// bounds make them (`'\u20000'` is U+2000 then '0': the range U+2001–U+2A6D).
fn is_chinese(c: char) -> bool {
    const RANGES: [(u32, u32); 22] = [
        (0x3400, 0x4db5),
        (0x4e00, 0x9fa5),
        (0x9fa6, 0x9fbb),
        (0xf900, 0xfa2d),
        (0xfa30, 0xfa6a),
        (0xfa70, 0xfad9),
        (0x2001, 0x2a6d),
        (0x2f81, 0x2fa1),
        (0xff00, 0xffef),
        (0x2e80, 0x2eff),
        (0x3000, 0x303f),
        (0x31c0, 0x31ef),
        (0x2f00, 0x2fdf),
        (0x2ff0, 0x2fff),
        (0x3100, 0x312f),
        (0x31a0, 0x31bf),
        (0xfe10, 0xfe1f),
        (0xfe30, 0xfe4f),
        (0x2600, 0x26ff),
        (0x2700, 0x27bf),
        (0x3200, 0x32ff),
        (0x3300, 0x33ff),
    ];
    let c = c as u32;
    RANGES.iter().any(|&(a, b)| a <= c && c <= b)
}

/// A metric's result, with what sacreBLEU reports next to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub metric: &'static str,
    pub score: f64,
    pub signature: String,
    /// BLEU only: brevity penalty, n-gram precisions (percent), lengths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precisions: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sys_len: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_len: Option<u64>,
}

/// How to score: the metric and sacreBLEU's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreOptions {
    pub chrf: bool,
    pub tokenize: Tokenize,
    pub lowercase: bool,
}

fn word_ngrams(line: &str) -> (HashMap<Vec<&str>, u64>, u64) {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    (counts, tokens.len() as u64)
}

/// BLEU's sufficient statistics of one segment: hypothesis length, closest reference
/// length, matched and total n-grams per order.
fn bleu_stats(hyp: &str, refs: &[String]) -> Vec<u64> {
    let mut ref_max: HashMap<Vec<&str>, u64> = HashMap::new();
    let mut ref_lens = Vec::new();
    for r in refs {
        let (counts, len) = word_ngrams(r);
        ref_lens.push(len);
        for (g, c) in counts {
            let slot = ref_max.entry(g).or_insert(0);
            *slot = (*slot).max(c);
        }
    }
    let (hyp_counts, hyp_len) = word_ngrams(hyp);
    let mut closest: Option<(u64, u64)> = None;
    for &len in &ref_lens {
        let diff = len.abs_diff(hyp_len);
        closest = match closest {
            Some((d, l)) if diff > d || (diff == d && len >= l) => Some((d, l)),
            _ => Some((diff, len)),
        };
    }
    let mut stats = vec![0u64; 2 + 2 * MAX_ORDER];
    stats[0] = hyp_len;
    stats[1] = closest.map_or(0, |(_, l)| l);
    for (g, c) in &hyp_counts {
        let n = g.len() - 1;
        stats[2 + MAX_ORDER + n] += c;
        stats[2 + n] += (*c).min(ref_max.get(g).copied().unwrap_or(0));
    }
    stats
}

/// BLEU from summed statistics (`exp` smoothing; `effective_order` for sentences).
fn bleu_from_stats(stats: &[u64], effective_order: bool) -> (f64, f64, Vec<f64>) {
    let (sys_len, ref_len) = (stats[0] as f64, stats[1] as f64);
    let (correct, total) = (&stats[2..2 + MAX_ORDER], &stats[2 + MAX_ORDER..]);
    let bp = if sys_len < ref_len {
        if sys_len > 0.0 {
            (1.0 - ref_len / sys_len).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = vec![0.0; MAX_ORDER];
    if correct.iter().all(|&c| c == 0) {
        return (0.0, bp, precisions);
    }
    let (mut smooth, mut order) = (1.0, MAX_ORDER);
    for n in 0..MAX_ORDER {
        if total[n] == 0 {
            break;
        }
        if effective_order {
            order = n + 1;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    // sacreBLEU's my_log: log(0) counts as −9999999999.
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let mean = precisions[..order].iter().map(|&p| log(p)).sum::<f64>() / order as f64;
    (bp * mean.exp(), bp, precisions)
}

/// Character n-gram counts of a segment with its whitespace removed, orders 1–6.
fn char_ngrams(line: &str) -> Vec<HashMap<String, u64>> {
    let chars: Vec<char> = line.split_whitespace().flat_map(str::chars).collect();
    (1..=CHAR_ORDER)
        .map(|n| {
            let mut counts = HashMap::new();
            for w in chars.windows(n) {
                *counts.entry(w.iter().collect::<String>()).or_insert(0) += 1;
            }
            counts
        })
        .collect()
}

/// chrF's F-score of `[hyp, ref, match]` counts per order, sacreBLEU's way: the
/// precisions and recalls averaged over the orders where both counts exist.
fn chrf_from_stats(stats: &[u64]) -> f64 {
    let factor = BETA * BETA;
    let (mut prec, mut rec, mut orders) = (0.0, 0.0, 0);
    for s in stats.chunks(3) {
        let (hyp, reference, matched) = (s[0], s[1], s[2]);
        if hyp > 0 && reference > 0 {
            prec += matched as f64 / hyp as f64;
            rec += matched as f64 / reference as f64;
            orders += 1;
        }
    }
    if orders == 0 {
        return 0.0;
    }
    let (p, r) = (prec / orders as f64, rec / orders as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * p * r / (factor * p + r)
}

/// chrF statistics of one segment: those of its best reference by F-score.
fn chrf_stats(hyp: &str, refs: &[String]) -> Vec<u64> {
    let h = char_ngrams(hyp);
    let mut best: Option<(f64, Vec<u64>)> = None;
    for r in refs {
        let r = char_ngrams(r);
        let mut stats = Vec::with_capacity(3 * CHAR_ORDER);
        for (hc, rc) in h.iter().zip(&r) {
            let matched: u64 = hc
                .iter()
                .map(|(g, c)| (*c).min(rc.get(g).copied().unwrap_or(0)))
                .sum();
            let hyp_total: u64 = if rc.is_empty() { 0 } else { hc.values().sum() };
            stats.extend([hyp_total, rc.values().sum(), matched]);
        }
        let f = chrf_from_stats(&stats);
        if best.as_ref().is_none_or(|(b, _)| f > *b) {
            best = Some((f, stats));
        }
    }
    best.map_or(vec![0; 3 * CHAR_ORDER], |(_, s)| s)
}

fn preprocess(line: &str, opts: &ScoreOptions) -> String {
    let line = if opts.lowercase {
        line.to_lowercase()
    } else {
        line.to_string()
    };
    match opts.chrf {
        true => line,
        false => opts.tokenize.apply(line.trim_end()),
    }
}

fn signature(opts: &ScoreOptions, refs: usize, sentence: bool) -> String {
    let case = if opts.lowercase { "lc" } else { "mixed" };
    let version = concat!("lmforge-", env!("CARGO_PKG_VERSION"));
    if opts.chrf {
        format!("nrefs:{refs}|case:{case}|eff:yes|nc:6|nw:0|space:no|version:{version}")
    } else {
        let eff = if sentence { "yes" } else { "no" };
        format!(
            "nrefs:{refs}|case:{case}|eff:{eff}|tok:{}|smooth:exp|version:{version}",
            opts.tokenize.name()
        )
    }
}

fn segment_stats(hyp: &str, refs: &[&str], opts: &ScoreOptions) -> Vec<u64> {
    let hyp = preprocess(hyp, opts);
    let refs: Vec<String> = refs.iter().map(|r| preprocess(r, opts)).collect();
    match opts.chrf {
        true => chrf_stats(&hyp, &refs),
        false => bleu_stats(&hyp, &refs),
    }
}

fn score_from_stats(stats: &[u64], opts: &ScoreOptions, refs: usize, sentence: bool) -> Score {
    let signature = signature(opts, refs, sentence);
    if opts.chrf {
        return Score {
            metric: "chrF2",
            score: chrf_from_stats(stats),
            signature,
            bp: None,
            precisions: None,
            sys_len: None,
            ref_len: None,
        };
    }
    let (score, bp, precisions) = bleu_from_stats(stats, sentence);
    Score {
        metric: "BLEU",
        score,
        signature,
        bp: Some(bp),
        precisions: Some(precisions),
        sys_len: Some(stats[0]),
        ref_len: Some(stats[1]),
    }
}

/// The corpus score of `hyps` against reference streams `refs` (each as long as
/// `hyps`): statistics summed over segments, then the metric.
pub fn corpus_score(hyps: &[String], refs: &[Vec<String>], opts: &ScoreOptions) -> Result<Score> {
    check_streams(hyps, refs)?;
    let mut total: Vec<u64> = Vec::new();
    for (i, hyp) in hyps.iter().enumerate() {
        let segment: Vec<&str> = refs.iter().map(|r| r[i].as_str()).collect();
        let stats = segment_stats(hyp, &segment, opts);
        if total.is_empty() {
            total = stats;
        } else {
            total.iter_mut().zip(stats).for_each(|(t, s)| *t += s);
        }
    }
    Ok(score_from_stats(&total, opts, refs.len(), false))
}

/// Each segment's score (sentence BLEU with effective order, as sacreBLEU's).
pub fn sentence_scores(
    hyps: &[String],
    refs: &[Vec<String>],
    opts: &ScoreOptions,
) -> Result<Vec<Score>> {
    check_streams(hyps, refs)?;
    Ok(hyps
        .iter()
        .enumerate()
        .map(|(i, hyp)| {
            let segment: Vec<&str> = refs.iter().map(|r| r[i].as_str()).collect();
            score_from_stats(&segment_stats(hyp, &segment, opts), opts, refs.len(), true)
        })
        .collect())
}

fn check_streams(hyps: &[String], refs: &[Vec<String>]) -> Result<()> {
    ensure!(!refs.is_empty(), "at least one reference stream is needed");
    ensure!(!hyps.is_empty(), "no hypothesis lines");
    for (k, r) in refs.iter().enumerate() {
        ensure!(
            r.len() == hyps.len(),
            "reference stream {} has {} lines, the hypotheses {}",
            k + 1,
            r.len(),
            hyps.len()
        );
    }
    Ok(())
}
