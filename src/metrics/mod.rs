//! Task metrics computed the way the reference tools compute them, so figures can be
//! compared with theirs: classification ([`classification`], scikit-learn's) and
//! generated text ([`generation`], sacreBLEU's BLEU and chrF).

pub mod classification;
pub mod generation;

pub use classification::ClassificationReport;
