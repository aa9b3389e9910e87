//! The small blocking NBD client the tests use where they must know exactly
//! which requests the server acknowledged. It lives in
//! `mirror_agent::nbd::client` (also used by `mdctrl demo`) and shares no
//! code with the server.

pub use mirror_agent::nbd::client::*;
