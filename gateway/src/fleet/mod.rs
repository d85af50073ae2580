//! The fleet view (issue 20): what the gateway tells its upstreams about itself, and the
//! history it sends again on request ([`replay`], its adapter [`replayer`]).

pub mod replay;
pub mod replayer;
