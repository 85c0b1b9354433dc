//! Task metrics computed the way the reference tools compute them, so figures can be
//! compared with theirs: classification ([`classification`], scikit-learn's).

pub mod classification;

pub use classification::ClassificationReport;
