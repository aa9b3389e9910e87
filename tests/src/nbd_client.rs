//! The small blocking NBD client the tests use where they must know exactly
//! which requests the server acknowledged. It lives in
//! `mirror_agent::nbd::client` (also used by `mdctrl demo`) and shares no
//! code with the server.

pub use mirror_agent::nbd::client::*;

/// Sends a 4 KiB write of `byte` at each of `offsets` on `nbd` from a thread
/// of its own, then reads replies until the connection ends: for a server
/// whose disk stalls, where the replies may come late or never. Join the
/// thread once the server closed the connection or its disk answered again.
pub fn writes_in_background(
    mut nbd: NbdClient,
    offsets: Vec<u64>,
    byte: u8,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for (i, off) in offsets.into_iter().enumerate() {
            if nbd
                .send_write(i as u64 + 1, off, &[byte; 4096], false)
                .is_err()
            {
                return;
            }
        }
        if let Ok(mut r) = nbd.reply_reader() {
            while NbdClient::read_reply(&mut r).is_ok() {}
        }
    })
}
