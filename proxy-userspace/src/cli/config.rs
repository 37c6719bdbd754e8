//! Settings in kube-proxy's forms: Go durations for now.

mod duration;

pub use duration::parse_go_duration;
