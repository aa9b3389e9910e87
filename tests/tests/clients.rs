//! Real NBD clients against a standalone agent, every test once per local
//! I/O engine (`NAME::io_uring` with O_DIRECT under /var/tmp, `NAME::portable`).
//! Data written through a client is also checked in the agent's data file
//! directly, after deactivation or after a kill -9.

use std::process::Command;
use std::time::Duration;

use tests::data::{assert_files_equal, assert_range_is, random_bytes, random_image, seed, sha256};
use tests::run::{all_output, stdout};
use tests::{
    on_both_engines, require_root, require_tool, require_tools, run_ok, ClusterOpts, Engine,
    FuseLoopMount, TestCluster, CMD_TIMEOUT,
};

const MIB: u64 = 1 << 20;

on_both_engines!(
    nbdinfo_reports_size_and_flags,
    nbdinfo_map_shows_data_and_holes,
    qemu_img_convert_round_trip,
    qemu_io_patterns_zeroes_discard_fua,
    nbdcopy_both_directions,
    fio_nbd_engine_with_crc32c_verify,
    ext4_through_nbdfuse_and_loop,
    fua_write_survives_kill9,
    write_and_flush_survive_kill9,
);

/// A standalone cluster serving md1 on `engine` (checked in the status).
fn active(engine: Engine) -> (TestCluster, tests::Agent) {
    let (c, agent) = TestCluster::standalone_active(ClusterOpts::new(engine));
    assert_engine(&c, engine);
    (c, agent)
}

/// The status names the engine the test asked for (so the matrix is real).
fn assert_engine(c: &TestCluster, engine: Engine) {
    let s = c.status_json();
    let got = s["engine"].as_str().unwrap_or_default().to_string();
    if let Some(prefix) = engine.status_prefix() {
        assert!(
            got.starts_with(prefix),
            "status engine is {got:?}, expected {prefix}..."
        );
    }
}

/// Runs qemu-io with `-c` commands on `uri`; fails on a non-zero exit or any
/// reported failure (pattern mismatch, I/O error).
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    let out = run_ok(&mut c, CMD_TIMEOUT);
    let all = all_output(&out);
    let lower = all.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error") && !lower.contains("mismatch"),
        "qemu-io reported a failure for {cmds:?}:\n{all}"
    );
    all
}

fn nbdinfo_reports_size_and_flags(engine: Engine) {
    if !require_tool("nbdinfo") {
        return;
    }
    let (c, _agent) = active(engine);
    let out = run_ok(
        Command::new("nbdinfo").arg("--json").arg(c.nbd_uri()),
        CMD_TIMEOUT,
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{}", stdout(&out)));
    assert_eq!(v["protocol"], "newstyle-fixed", "{v:#}");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "md1", "{v:#}");
    assert_eq!(e["export-size"], c.opts.size, "{v:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} in {v:#}");
    }
    assert_eq!(e["is_read_only"], false, "{v:#}");
    // The one metadata context, listed with NBD_OPT_LIST_META_CONTEXT.
    assert_eq!(
        e["contexts"],
        serde_json::json!(["base:allocation"]),
        "{v:#}"
    );
    let r = &c.config.resources[0];
    assert_eq!(e["block_size_minimum"], r.nbd_block_size_min, "{v:#}");
    assert_eq!(
        e["block_size_preferred"],
        4096u64.max(r.nbd_block_size_min),
        "{v:#}"
    );
    assert_eq!(e["block_size_maximum"], r.nbd_max_request, "{v:#}");
}

/// `base:allocation` through libnbd: data written by one client is mapped as
/// data, a range written then discarded as a hole that reads as zeroes.
fn nbdinfo_map_shows_data_and_holes(engine: Engine) {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let (c, _agent) = active(engine);
    let uri = c.nbd_uri();
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1M 1M",
            "write -P 0xcd 4M 1M",
            "discard 4M 1M",
            "flush",
        ],
    );
    let out = run_ok(
        Command::new("nbdinfo").args(["--map", "--json"]).arg(&uri),
        CMD_TIMEOUT,
    );
    let map: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("nbdinfo --map --json is not JSON ({e}):\n{}", stdout(&out)));
    let extents = map
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {map:#}"));
    let mut next = 0u64;
    for e in extents {
        assert_eq!(
            e["offset"].as_u64(),
            Some(next),
            "extents are consecutive: {map:#}"
        );
        next += e["length"].as_u64().expect("length");
    }
    assert_eq!(next, c.opts.size, "the map covers the volume: {map:#}");
    let type_at = |x: u64| {
        extents
            .iter()
            .find(|e| {
                let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                x >= o && x < o + l
            })
            .and_then(|e| e["type"].as_u64())
    };
    for x in [MIB, 2 * MIB - 1] {
        assert_eq!(type_at(x), Some(0), "written byte {x} is data: {map:#}");
    }
    for x in [4 * MIB, 5 * MIB - 1] {
        assert_eq!(
            type_at(x),
            Some(3),
            "discarded byte {x} is hole,zero: {map:#}"
        );
    }
    qemu_io(&uri, &["read -P 0xab 1M 1M", "read -P 0 4M 1M"]);
}

fn qemu_img_convert_round_trip(engine: Engine) {
    if !require_tool("qemu-img") {
        return;
    }
    let (c, _agent) = active(engine);
    let src = c.dir().join("src.img");
    let out = c.dir().join("out.img");
    let len = 48 * MIB;
    random_image(&src, len, seed("qemu-img image"));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(c.nbd_uri()),
        CMD_TIMEOUT,
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(c.nbd_uri())
            .arg(&out),
        CMD_TIMEOUT,
    );
    assert_eq!(
        std::fs::metadata(&out).expect("out.img").len(),
        c.opts.size,
        "exported image size"
    );
    assert_files_equal(&src, &out, Some(len));
    assert_range_is(&out, len, (c.opts.size - len) as usize, 0);
    c.deactivate();
    assert_files_equal(&src, &c.data_path(), Some(len));
    assert_range_is(&c.data_path(), len, (c.opts.size - len) as usize, 0);
}

fn qemu_io_patterns_zeroes_discard_fua(engine: Engine) {
    if !require_tool("qemu-io") {
        return;
    }
    let (c, _agent) = active(engine);
    let uri = c.nbd_uri();
    qemu_io(
        &uri,
        &[
            "write -P 0xa1 0 1M",
            "write -f -P 0xb2 1M 1M",
            "write -P 0xc3 2M 1M",
            "write -P 0xd4 3M 1M",
            "write -P 0xe5 4M 64k",
            "flush",
        ],
    );
    // A second connection: zeroes, discard and a sub-4KiB write over the data.
    qemu_io(
        &uri,
        &[
            "write -z 2M 1M",
            "discard 3M 1M",
            "write -f -P 0x77 4608 1536",
            "write -z -f 5M 512k",
            "flush",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0xa1 0 4608",
            "read -P 0x77 4608 1536",
            "read -P 0xa1 6144 1042432",
            "read -P 0xb2 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0 3M 1M",
            "read -P 0xe5 4M 64k",
            "read -P 0 5M 512k",
        ],
    );
    let st = c.status_json();
    assert_eq!(st["nbd"]["errors"], 0, "NBD errors in {st:#}");
    c.deactivate();
    let data = c.data_path();
    assert_range_is(&data, 0, 4608, 0xa1);
    assert_range_is(&data, 4608, 1536, 0x77);
    assert_range_is(&data, 6144, (MIB - 6144) as usize, 0xa1);
    assert_range_is(&data, MIB, MIB as usize, 0xb2);
    assert_range_is(&data, 2 * MIB, 2 * MIB as usize, 0);
    assert_range_is(&data, 4 * MIB, 64 << 10, 0xe5);
    assert_range_is(&data, 5 * MIB, 512 << 10, 0);
}

fn nbdcopy_both_directions(engine: Engine) {
    if !require_tool("nbdcopy") {
        return;
    }
    let (c, _agent) = active(engine);
    let s = seed("nbdcopy images");
    let first = c.dir().join("first.img");
    let second = c.dir().join("second.img");
    let back = c.dir().join("back.img");
    // The second image's zero holes land on the first one's data: the copy
    // must really zero them (write_zeroes/trim), not skip them.
    random_image(&first, c.opts.size, s);
    random_image(&second, c.opts.size, s.wrapping_add(1));
    for img in [&first, &second] {
        run_ok(
            Command::new("nbdcopy")
                .arg("--flush")
                .arg(img)
                .arg(c.nbd_uri()),
            CMD_TIMEOUT,
        );
    }
    run_ok(
        Command::new("nbdcopy").arg(c.nbd_uri()).arg(&back),
        CMD_TIMEOUT,
    );
    assert_files_equal(&second, &back, None);
    c.deactivate();
    assert_files_equal(&second, &c.data_path(), None);
}

fn fio_nbd_engine_with_crc32c_verify(engine: Engine) {
    if !require_tool("fio") {
        return;
    }
    let (c, _agent) = active(engine);
    let uri_arg = format!("--uri={}", c.nbd_uri());
    let fio = |name: &str, extra: &[&str]| {
        let mut cmd = Command::new("fio");
        cmd.args([
            &format!("--name={name}"),
            "--ioengine=nbd",
            &uri_arg,
            "--output-format=json",
            "--iodepth=16",
            // No verify state file: fio would leave it in the working
            // directory (the source tree), and the runs verify without it.
            "--verify_state_save=0",
        ])
        .args(extra);
        let out = run_ok(&mut cmd, Duration::from_secs(120));
        let text = stdout(&out);
        // fio may print notes before the JSON document.
        let json = &text[text.find('{').unwrap_or(0)..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| {
            panic!(
                "fio output is not JSON ({e}):\n{text}\n{}",
                all_output(&out)
            )
        });
        for job in v["jobs"].as_array().expect("fio jobs") {
            assert_eq!(job["error"], 0, "fio job {name} reported an error: {job:#}");
        }
        v
    };
    // Random 4k writes over 32 MiB, then fio reads everything back and
    // checks each block's crc32c header.
    fio(
        "randwrite-verify",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--offset=0",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    // Sequential 64k writes in the other half, verified by a separate run
    // (a new connection) that only reads and verifies.
    let seq = [
        "--rw=write",
        "--bs=64k",
        "--size=32M",
        "--offset=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
    ];
    fio("seqwrite", &seq);
    let mut only = seq.to_vec();
    only.push("--verify_only=1");
    fio("seqwrite", &only);
    // Random reads, bounded in time.
    let v = fio(
        "randread",
        &[
            "--rw=randread",
            "--bs=4k",
            "--size=64M",
            "--time_based=1",
            "--runtime=2",
        ],
    );
    let reads = v["jobs"][0]["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(reads > 0, "fio randread read nothing: {v:#}");
    let st = c.status_json();
    assert_eq!(st["nbd"]["errors"], 0, "NBD errors after fio: {st:#}");
}

fn ext4_through_nbdfuse_and_loop(engine: Engine) {
    if !require_tools(&["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck"])
        || !require_root(
            "the ext4 test (nbdfuse + loop device + mount)",
            &["/dev/fuse", "/dev/loop-control"],
        )
    {
        return;
    }
    let (c, _agent) = active(engine);
    let work = c.dir().join("fs");
    let mut m = FuseLoopMount::attach(&work, &c.nbd_uri());
    m.mkfs_ext4();
    m.mount();
    let s = seed("ext4 files");
    let mut sums = Vec::new();
    for (i, len) in [
        3 * MIB as usize,
        MIB as usize + 12_345,
        4096,
        2 * MIB as usize,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = m.mount_point().join(format!("d{}", i % 2));
        std::fs::create_dir_all(&dir).expect("mkdir on ext4");
        let p = dir.join(format!("file{i}.bin"));
        std::fs::write(&p, random_bytes(len, s.wrapping_add(i as u64)))
            .expect("writing a file on ext4");
        sums.push((p.clone(), sha256(&p)));
    }
    run_ok(&mut Command::new("sync"), CMD_TIMEOUT);
    m.umount();
    m.fsck_clean();
    m.mount();
    for (p, sum) in &sums {
        assert_eq!(&sha256(p), sum, "checksum of {} after remount", p.display());
    }
    m.teardown();
    tests::fsmount::wait_unmounted(&work.join("fuse"));
    let st = c.status_json();
    assert_eq!(
        st["nbd"]["errors"], 0,
        "NBD errors during the file system test: {st:#}"
    );
    assert!(
        st["nbd"]["written_bytes"].as_u64().unwrap_or(0) >= 6 * MIB,
        "written_bytes too small: {st:#}"
    );
}

fn fua_write_survives_kill9(engine: Engine) {
    if !require_tool("qemu-io") {
        return;
    }
    let (c, mut agent) = active(engine);
    qemu_io(&c.nbd_uri(), &["write -f -P 0x5a 1M 256k"]);
    agent.kill9();
    assert_range_is(&c.data_path(), MIB, 256 << 10, 0x5a);
    // The agent comes back after the crash and serves the same data.
    agent.start_again();
    agent.wait_ready();
    c.activate();
    qemu_io(&c.nbd_uri(), &["read -P 0x5a 1M 256k", "read -P 0 0 1M"]);
}

fn write_and_flush_survive_kill9(engine: Engine) {
    if !require_tool("qemu-io") {
        return;
    }
    let (c, mut agent) = active(engine);
    qemu_io(
        &c.nbd_uri(),
        &["write -P 0x3c 2M 128k", "write -P 0x4d 7M 4k", "flush"],
    );
    agent.kill9();
    assert_range_is(&c.data_path(), 2 * MIB, 128 << 10, 0x3c);
    assert_range_is(&c.data_path(), 7 * MIB, 4096, 0x4d);
}

/// O_DIRECT with write-behind (`write_behind`, the default): small writes
/// issued one at a time, without FUA or flush, are answered from the page
/// cache. The agent is killed right after the last answer: every write it
/// answered is in the data file, and the restarted agent serves them.
#[test]
fn lone_writes_answered_from_the_page_cache_survive_kill9() {
    if !require_tool("qemu-io") {
        return;
    }
    let (c, mut agent) = active(Engine::IoUring);
    let engine = c.status_json()["engine"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        engine.contains("behind (RWF_DONTCACHE)"),
        "write-behind is not on, the test would prove nothing: {engine}"
    );
    // qemu-io runs its commands one after another: each write is alone.
    let cmds: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {:#x} {} 4k", 0x40 + i, (3 * MIB) + i * 12_288))
        .chain(std::iter::once(format!(
            "write -P 0x77 {} 512",
            5 * MIB + 1024
        )))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&c.nbd_uri(), &cmds);
    agent.kill9();
    for i in 0..16u64 {
        assert_range_is(&c.data_path(), 3 * MIB + i * 12_288, 4096, 0x40 + i as u8);
    }
    assert_range_is(&c.data_path(), 5 * MIB + 1024, 512, 0x77);
    agent.start_again();
    agent.wait_ready();
    c.activate();
    qemu_io(
        &c.nbd_uri(),
        &["read -P 0x40 3M 4k", "read -P 0x77 5243904 512", "flush"],
    );
}
