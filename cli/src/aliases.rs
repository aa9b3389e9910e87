//! The ancestor's spellings (`clpmdctrl --active -nomount md1`, `--create force md1`,
//! `clpmdstat --mirror md1`, ...) rewritten to `mdctrl` subcommands before clap
//! parses the command line, so operators' muscle memory keeps working.

/// Rewrite `args` (without the program name) from the ancestor's option-style
/// verbs to subcommands. Global options (`--config F`, `--node N`, with `=` or
/// as two words) may come before the verb and are kept in place. Anything that
/// is not an ancestor spelling is returned unchanged.
pub fn rewrite(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut i = 0;
    // Keep leading global options as they are.
    while i < args.len() {
        let a = args[i].as_str();
        if (a == "--config" || a == "--node") && i + 1 < args.len() {
            out.push(args[i].clone());
            out.push(args[i + 1].clone());
            i += 2;
        } else if a.starts_with("--config=") || a.starts_with("--node=") {
            out.push(args[i].clone());
            i += 1;
        } else {
            break;
        }
    }
    let rest = &args[i..];
    let Some(verb) = rest.first() else {
        return args;
    };
    let tail: Vec<String> = rest[1..].to_vec();
    let mapped: Option<Vec<String>> = match verb.as_str() {
        "--create" => Some(match tail.first().map(String::as_str) {
            Some("force") => std::iter::once("init".to_string())
                .chain(std::iter::once("--force".to_string()))
                .chain(tail[1..].iter().cloned())
                .collect(),
            _ => std::iter::once("init".to_string())
                .chain(tail.iter().cloned())
                .collect(),
        }),
        "--active" => Some(
            std::iter::once("activate".to_string())
                .chain(tail.iter().map(|t| {
                    if t == "-nomount" {
                        "--nomount".to_string()
                    } else {
                        t.clone()
                    }
                }))
                .collect(),
        ),
        "--deactive" | "--deactivate" => Some(with_verb("deactivate", &tail)),
        "--mirror" => Some(with_verb("status", &tail)),
        "--recovery" => Some(with_verb("recover", &tail)),
        "--force" => Some(with_verb("force", &tail)),
        "--break" => Some(with_verb("break", &tail)),
        _ => None,
    };
    match mapped {
        Some(m) => {
            out.extend(m);
            out
        }
        None => args,
    }
}

fn with_verb(verb: &str, tail: &[String]) -> Vec<String> {
    std::iter::once(verb.to_string())
        .chain(tail.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    fn rw(s: &str) -> String {
        rewrite(s.split_whitespace().map(String::from).collect()).join(" ")
    }

    #[test]
    fn ancestor_spellings() {
        assert_eq!(rw("--create force md1"), "init --force md1");
        assert_eq!(rw("--create md1"), "init md1");
        assert_eq!(rw("--active -nomount md1"), "activate --nomount md1");
        assert_eq!(rw("--active md1"), "activate md1");
        assert_eq!(rw("--deactive md1"), "deactivate md1");
        assert_eq!(rw("--mirror md1"), "status md1");
        assert_eq!(rw("--recovery md1"), "recover md1");
        assert_eq!(rw("--force server1 md1"), "force server1 md1");
        assert_eq!(rw("--break md1"), "break md1");
    }

    #[test]
    fn global_options_are_kept_before_the_verb() {
        assert_eq!(
            rw("--config c.toml --node s1 --active -nomount md1"),
            "--config c.toml --node s1 activate --nomount md1"
        );
        assert_eq!(
            rw("--config=c.toml --mirror md1"),
            "--config=c.toml status md1"
        );
    }

    #[test]
    fn modern_spellings_unchanged() {
        assert_eq!(
            rw("--config c.toml status md1 --json"),
            "--config c.toml status md1 --json"
        );
        assert_eq!(rw("init --force md1"), "init --force md1");
        assert_eq!(rw(""), "");
    }
}
