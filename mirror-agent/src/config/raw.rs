//! The file as written: serde structs mirroring the TOML layout, every table
//! `deny_unknown_fields`, and the mapping of TOML parser errors to
//! [`ConfigError`] with a key path reconstructed from the error's byte span.
//!
//! Keys are `Option` here even when required, so that a missing key is
//! reported by the builder with its full key path (`resource.md1.server.server2.data_path`)
//! instead of serde's bare "missing field". Sizes and durations are kept as
//! raw [`toml::Value`]s (string or integer) and parsed by the builder, for
//! the same reason.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ConfigError;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub cluster: Option<RawCluster>,
    pub timeouts: Option<RawTimeouts>,
    #[serde(default)]
    pub server: Vec<RawServer>,
    #[serde(default)]
    pub resource: Vec<RawResource>,
}

/// `[cluster]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub name: Option<String>,
    pub secret_file: Option<String>,
    pub tls: Option<RawTls>,
    pub admin_group: Option<String>,
}

/// `[cluster.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub ca: Option<String>,
}

/// `[timeouts]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub connect: Option<toml::Value>,
    pub send: Option<toml::Value>,
    pub ack: Option<toml::Value>,
    pub receive: Option<toml::Value>,
    pub heartbeat_interval: Option<toml::Value>,
    pub heartbeat_timeout: Option<toml::Value>,
    pub metadata_check_interval: Option<toml::Value>,
    pub io_stall: Option<toml::Value>,
}

/// One `[[server]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub name: Option<String>,
    pub address: Option<String>,
    pub listen_address: Option<String>,
    pub control_port: Option<i64>,
    pub admin_socket: Option<String>,
}

/// One `[[resource]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResource {
    pub name: Option<String>,
    pub size: Option<toml::Value>,
    pub mode: Option<String>,
    pub region_size: Option<toml::Value>,
    pub auto_recovery: Option<bool>,
    pub async_queue: Option<toml::Value>,
    pub resync_rate: Option<toml::Value>,
    pub keep_dirty: Option<i64>,
    pub hot_extent_size: Option<toml::Value>,
    pub engine: Option<String>,
    pub direct_io: Option<String>,
    pub write_behind: Option<bool>,
    pub nbd_block_size_min: Option<toml::Value>,
    pub nbd_max_request: Option<toml::Value>,
    pub nbd_idle_poll: Option<toml::Value>,
    pub divergent_save_dir: Option<String>,
    pub server: Option<BTreeMap<String, RawNode>>,
}

/// One `[resource.server.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub data_path: Option<String>,
    pub cluster_partition: Option<String>,
    pub mirror_port: Option<i64>,
    pub nbd_socket: Option<String>,
    pub nbd_tcp: Option<String>,
    pub nbd_device: Option<String>,
    pub mount_point: Option<String>,
    pub fs: Option<String>,
    pub mount_options: Option<String>,
    pub divergent_save_dir: Option<String>,
}

/// Keys of `[[resource]]` itself (for the misplaced-key hint).
const RESOURCE_KEYS: &[&str] = &[
    "name",
    "size",
    "mode",
    "region_size",
    "auto_recovery",
    "async_queue",
    "resync_rate",
    "keep_dirty",
    "hot_extent_size",
    "engine",
    "direct_io",
    "write_behind",
    "nbd_block_size_min",
    "nbd_max_request",
    "nbd_idle_poll",
];

/// Parses the text, mapping the parser's error to [`ConfigError`].
pub(super) fn parse(text: &str, file: &Path) -> Result<RawFile, ConfigError> {
    toml::from_str(text).map_err(|e| map_toml_error(&e, text, file))
}

fn map_toml_error(e: &toml::de::Error, text: &str, file: &Path) -> ConfigError {
    let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let (line, column) = line_col(text, offset);
    let table = table_path_at(text, offset);
    let msg = e.message().trim().to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let mut expected = tail
                .trim_start_matches(',')
                .trim()
                .trim_start_matches("expected one of")
                .trim_start_matches("expected")
                .trim()
                .to_string();
            // TOML puts every key after a header into that table, so a
            // resource-level key written below `[resource.server.X]` lands
            // in the node table: say so.
            if table.starts_with("resource[")
                && table.contains(".server.")
                && RESOURCE_KEYS.contains(&field)
            {
                expected.push_str(&format!(
                    " (`{field}` is a resource key: put it before the first [resource.server.NAME] section)"
                ));
            }
            // An unknown table is reported at its own header: the open
            // table path already ends with the unknown key.
            let on_header = key_on_line(text, offset).is_none();
            let key = if on_header && (table == field || table.ends_with(&format!(".{field}"))) {
                table
            } else {
                join_key(&table, field)
            };
            return ConfigError::UnknownKey {
                file: file.to_path_buf(),
                key,
                line,
                column,
                expected,
            };
        }
    }
    // Type errors point at the value: name the key written on that line.
    let key = match key_on_line(text, offset) {
        Some(k) => join_key(&table, &k),
        None if table.is_empty() => "(top level)".to_string(),
        None => table,
    };
    ConfigError::Syntax {
        file: file.to_path_buf(),
        key,
        line,
        column,
        message: msg,
    }
}

fn join_key(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The key `k` of a `k = v` line containing `offset`, if that line is one.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(text, offset);
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let end = text[start..]
        .find('\n')
        .map(|i| start + i)
        .unwrap_or(text.len());
    let line = text[start..end].trim();
    if line.starts_with('[') || line.starts_with('#') {
        return None;
    }
    let (k, _) = line.split_once('=')?;
    let parts = split_dotted(k.trim());
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("."))
    }
}

/// Reconstructs the key path of the table that is open at `offset`, with
/// array-of-tables indices: `resource[0].server.server3`. This follows the
/// table headers only (the schema uses no inline arrays of tables), which is
/// exactly what a reader of the file sees.
fn table_path_at(text: &str, offset: usize) -> String {
    let mut arrays: BTreeMap<String, usize> = BTreeMap::new();
    let mut current = String::new();
    let mut pos = 0usize;
    for line in text.split_inclusive('\n') {
        let line_start = pos;
        pos += line.len();
        let t = line.trim();
        // Lines after the offset cannot change the open table; a header on
        // the error line itself counts (errors about a table point at it).
        if line_start > offset {
            break;
        }
        if !t.starts_with('[') {
            continue;
        }
        let (is_array, inner) = if let Some(r) = t.strip_prefix("[[") {
            (true, r.split("]]").next().unwrap_or(""))
        } else {
            (false, t[1..].split(']').next().unwrap_or(""))
        };
        let parts = split_dotted(inner.trim());
        if parts.is_empty() {
            continue;
        }
        let full = parts.join(".");
        if is_array {
            *arrays.entry(full.clone()).or_insert(0) += 1;
        }
        // Render with indices for every prefix that is an array of tables.
        let mut rendered = String::new();
        let mut prefix = String::new();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                prefix.push('.');
                rendered.push('.');
            }
            prefix.push_str(p);
            rendered.push_str(p);
            if let Some(n) = arrays.get(&prefix) {
                rendered.push_str(&format!("[{}]", n.saturating_sub(1)));
            }
        }
        current = rendered;
    }
    current
}

/// Splits a dotted TOML key (`a."b.c".d`) into its parts, unquoting them.
fn split_dotted(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '.' => {
                parts.push(cur.trim().to_string());
                cur.clear();
            }
            None if c == '#' => break,
            None => cur.push(c),
        }
    }
    let last = cur.trim().to_string();
    if !last.is_empty() || !parts.is_empty() {
        parts.push(last);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_paths() {
        let text = "[cluster]\nname='x'\n[[server]]\nname='a'\n[[server]]\nname='b'\n[[resource]]\nname='r'\n[resource.server.b]\nfoo=1\n";
        let at = |needle: &str| table_path_at(text, text.find(needle).unwrap());
        assert_eq!(at("name='x'"), "cluster");
        assert_eq!(at("name='a'"), "server[0]");
        assert_eq!(at("name='b'"), "server[1]");
        assert_eq!(at("foo"), "resource[0].server.b");
        assert_eq!(at("[resource.server.b]"), "resource[0].server.b");
        assert_eq!(split_dotted("a.\"b.c\" . d"), vec!["a", "b.c", "d"]);
        assert_eq!(
            key_on_line(text, text.find("foo").unwrap()),
            Some("foo".into())
        );
        assert_eq!(line_col(text, text.find("foo").unwrap()), (10, 1));
    }
}
