//! YAML rule files: one qube's firewall rules in a form meant to be written by hand and kept in
//! version control (and used by the lab). The format is described in docs/rule-files.md:
//!
//! ```yaml
//! rules:
//!   - action: accept
//!     specialtarget: dns
//!   - action: accept
//!     proto: tcp
//!     dstports: 443
//!   - action: drop
//! ```
//!
//! Field names and values are exactly the admin API's (qubes-core-admin `qubes/firewall.py`), and
//! every rule goes through dom0's validation there with dom0's error messages. The list
//! is ordered and the first matching rule wins, as the agent's chains do; an empty list blocks everything.
//!
//! serde_yaml is used only inside this module, so it can be swapped for a fork without touching
//! the rest of the crate.

use std::fmt;

use serde_yaml::Value;

use crate::rule::{Property, Rule, RuleError};
use crate::xml::{build_rule, printable};

/// Largest rule file [`read`] accepts, in bytes.
pub const MAX_INPUT: usize = 4 * 1024 * 1024;

/// Why a YAML rule file could not be read. Rules are numbered from 0, as `qvm-firewall list`
/// numbers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YamlError {
    /// The input is larger than [`MAX_INPUT`].
    TooLarge { len: usize },
    /// Not YAML; the parser's message, which names the line and column.
    Syntax(String),
    /// The document is not a mapping with a `rules:` list.
    Structure(String),
    /// A field of a rule is unknown or has the wrong type; `message` names the field.
    Field { rule: usize, message: String },
    /// dom0 refuses the rule: its message, and the field holding the refused value (`None` for
    /// the checks across fields, such as `Required property 'action' not set`).
    Rule {
        rule: usize,
        field: Option<String>,
        error: RuleError,
    },
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            YamlError::TooLarge { len } => write!(
                f,
                "rule file is too large: {len} bytes (at most {MAX_INPUT} accepted)"
            ),
            YamlError::Syntax(msg) => write!(f, "invalid YAML: {}", printable(msg)),
            YamlError::Structure(msg) => f.write_str(&printable(msg)),
            YamlError::Field { rule, message } => write!(f, "rule {rule}: {}", printable(message)),
            YamlError::Rule { rule, field, error } => {
                write!(f, "rule {rule}: {}", printable(error.message()))?;
                if let Some(field) = field {
                    write!(f, " (field '{}')", printable(field))?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for YamlError {}

/// The fields a rule may have, with the property each one sets. `dst4`, `dst6` and `dstname`
/// are the admin API's aliases of `dsthost` (reference 1.1).
const FIELDS: [(&str, Property); 11] = [
    ("action", Property::Action),
    ("dsthost", Property::Dsthost),
    ("dst4", Property::Dsthost),
    ("dst6", Property::Dsthost),
    ("dstname", Property::Dsthost),
    ("proto", Property::Proto),
    ("dstports", Property::Dstports),
    ("icmptype", Property::Icmptype),
    ("specialtarget", Property::Specialtarget),
    ("expire", Property::Expire),
    ("comment", Property::Comment),
];

/// The order values are validated in: firewall.xml's (reference 1.4), as dom0 does on load.
const XML_ORDER: [Property; 8] = [
    Property::Action,
    Property::Comment,
    Property::Expire,
    Property::Dsthost,
    Property::Proto,
    Property::Specialtarget,
    Property::Dstports,
    Property::Icmptype,
];

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Reads a YAML rule file: a mapping whose only key `rules` holds the ordered list of rules.
///
/// Each rule is a mapping of the fields `action`, `dsthost` (or `dst4`, `dst6`, `dstname`),
/// `proto`, `dstports`, `icmptype`, `specialtarget`, `expire` and `comment`. Values are strings,
/// except that `dstports`, `icmptype` and `expire` may also be integers. Every rule is validated
/// like dom0 validates firewall.xml ([`Rule::from_properties`], values in firewall.xml's order),
/// so a file is accepted exactly when dom0 would accept the same rules.
pub fn read(text: &str) -> Result<Vec<Rule>, YamlError> {
    if text.len() > MAX_INPUT {
        return Err(YamlError::TooLarge { len: text.len() });
    }
    let doc: Value = serde_yaml::from_str(text).map_err(|e| YamlError::Syntax(e.to_string()))?;
    let top = match doc {
        Value::Mapping(m) => m,
        Value::Null => {
            return Err(YamlError::Structure(
                "the rule file is empty: expected a 'rules:' list".to_string(),
            ))
        }
        other => {
            return Err(YamlError::Structure(format!(
                "expected a mapping with a 'rules:' list at the top of the file, found {}",
                describe(&other)
            )))
        }
    };
    let mut list = None;
    for (key, value) in top {
        match key.as_str() {
            Some("rules") => list = Some(value),
            Some(other) => {
                return Err(YamlError::Structure(format!(
                    "unknown top-level key '{other}': a rule file has only 'rules:'"
                )))
            }
            None => {
                return Err(YamlError::Structure(format!(
                    "unknown top-level key ({}): a rule file has only 'rules:'",
                    describe(&key)
                )))
            }
        }
    }
    let items = match list {
        Some(Value::Sequence(items)) => items,
        None => {
            return Err(YamlError::Structure(
                "missing 'rules:' list at the top of the file".to_string(),
            ))
        }
        Some(Value::Null) => {
            return Err(YamlError::Structure(
                "'rules:' is empty; write 'rules: []' for no rules (which blocks all traffic)"
                    .to_string(),
            ))
        }
        Some(other) => {
            return Err(YamlError::Structure(format!(
                "'rules:' must be a list of rules, found {}",
                describe(&other)
            )))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| read_rule(index, item))
        .collect()
}

fn read_rule(index: usize, item: &Value) -> Result<Rule, YamlError> {
    let field_err = |message: String| YamlError::Field {
        rule: index,
        message,
    };
    let Value::Mapping(map) = item else {
        return Err(field_err(format!(
            "expected a mapping of fields such as 'action: accept', found {}",
            describe(item)
        )));
    };
    // One slot per property, in XML_ORDER: (field name as written, value text).
    let mut slots: [Option<(&str, String)>; 8] = Default::default();
    for (key, value) in map {
        let Some(name) = key.as_str() else {
            return Err(field_err(format!(
                "field names must be strings, found {}",
                describe(key)
            )));
        };
        let Some(&(field, prop)) = FIELDS.iter().find(|(f, _)| *f == name) else {
            return Err(field_err(format!(
                "unknown field '{name}' (known fields: action, dsthost, dst4, dst6, dstname, \
                 proto, dstports, icmptype, specialtarget, expire, comment)"
            )));
        };
        let text = field_text(field, prop, value).map_err(field_err)?;
        let Some(slot) = XML_ORDER
            .iter()
            .position(|p| *p == prop)
            .and_then(|i| slots.get_mut(i))
        else {
            continue;
        };
        if slot.is_some() {
            // Only reachable through the dsthost aliases: the parser refuses repeated keys.
            return Err(YamlError::Rule {
                rule: index,
                field: Some(field.to_string()),
                error: RuleError::new(format!("Option '{}' already set", prop.name())),
            });
        }
        *slot = Some((field, text));
    }
    let mut fields = Vec::new();
    let mut props = Vec::new();
    for (prop, slot) in XML_ORDER.iter().zip(&slots) {
        if let Some((field, text)) = slot {
            fields.push(*field);
            props.push((*prop, text.as_str()));
        }
    }
    build_rule(&props).map_err(|(at, error)| YamlError::Rule {
        rule: index,
        field: at.and_then(|i| fields.get(i)).map(|f| (*f).to_string()),
        error,
    })
}

/// The text of one field's value, or a message naming the field.
fn field_text(field: &str, prop: Property, value: &Value) -> Result<String, String> {
    let numeric = matches!(
        prop,
        Property::Dstports | Property::Icmptype | Property::Expire
    );
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) if numeric => {
            if let Some(u) = n.as_u64() {
                Ok(u.to_string())
            } else if let Some(i) = n.as_i64() {
                Ok(i.to_string())
            } else {
                Err(format!("field '{field}' must be a whole number, not {n}"))
            }
        }
        other if numeric => Err(format!(
            "field '{field}' must be an integer or a string, not {}",
            describe(other)
        )),
        Value::Number(_) | Value::Bool(_) => Err(format!(
            "field '{field}' must be a string, not {} (put it in quotes)",
            describe(value)
        )),
        other => Err(format!(
            "field '{field}' must be a string, not {}",
            describe(other)
        )),
    }
}

/// Writes rules as a YAML rule file that [`read`] gives back unchanged.
///
/// The output is deterministic: one `- ` item per rule, fields in firewall.xml's order
/// (`action comment expire dsthost proto specialtarget dstports icmptype`, reference 1.4), the
/// address field always written `dsthost`, single ports, ICMP types and expiry times as plain
/// integers, and strings quoted only when YAML (1.1 or 1.2) could read them as something else.
/// Expired rules are kept: a rule file is the user's list, not what dom0 applies now.
pub fn write(rules: &[Rule]) -> String {
    if rules.is_empty() {
        return "rules: []\n".to_string();
    }
    let mut out = String::from("rules:\n");
    for rule in rules {
        for (i, (prop, value)) in rule.xml_properties().into_iter().enumerate() {
            out.push_str(if i == 0 { "  - " } else { "    " });
            out.push_str(prop.name());
            out.push_str(": ");
            let numeric = matches!(
                prop,
                Property::Dstports | Property::Icmptype | Property::Expire
            );
            if numeric && is_plain_integer(&value) {
                out.push_str(&value);
            } else {
                push_string(&mut out, &value);
            }
            out.push('\n');
        }
    }
    out
}

/// Decimal digits that every YAML reader takes as that same integer: no leading zero (YAML 1.1
/// reads `010` as octal, and serde_yaml reads it as a string), and within `u64`.
fn is_plain_integer(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
        && s.parse::<u64>().is_ok()
}

/// Words YAML 1.1 or 1.2 reads as null or a boolean (compared case-insensitively).
const RESERVED: [&str; 11] = [
    "null", "true", "false", "yes", "no", "on", "off", "y", "n", "nan", "inf",
];

/// Whether `s` can be written as a plain (unquoted) scalar and read back as the same string by
/// any YAML 1.1 or 1.2 reader. Deliberately conservative: when in doubt, quote.
fn is_plain_safe(s: &str) -> bool {
    let bytes = s.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    // Starts with a letter or digit: no indicator (`-`, `[`, `:`, `#`, `&`, `*`, `!`, `'`, ...)
    // and no `.inf` / `.5` style number.
    if !first.is_ascii_alphanumeric() || last == b' ' || last == b':' {
        return false;
    }
    if !bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b" ._/:-".contains(&b))
    {
        return false;
    }
    if s.contains(": ") {
        return false;
    }
    // Anything starting with a digit might be a number, date or sexagesimal (`1:30`) somewhere,
    // unless it holds a `/` (IPv4 and IPv6 networks: `192.168.0.0/24`, `2001:db8::/32`).
    if first.is_ascii_digit() && !s.contains('/') {
        return false;
    }
    !RESERVED.iter().any(|w| s.eq_ignore_ascii_case(w))
}

fn push_string(out: &mut String, s: &str) {
    if is_plain_safe(s) {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(Rule::api_form).collect()
    }

    fn err_text(text: &str) -> String {
        match read(text) {
            Ok(rules) => panic!("expected an error, got {:?}", api(&rules)),
            Err(e) => e.to_string(),
        }
    }

    const EXAMPLE: &str = r#"# rules for the qube "untrusted", first match wins
rules:
  - action: accept
    specialtarget: dns
  - action: accept
    proto: tcp
    dstports: 443          # or "1024-2048"
    comment: web only
  - action: accept
    dsthost: 192.168.1.0/24
  - action: drop
"#;

    #[test]
    fn example_parses() {
        assert_eq!(
            api(&read(EXAMPLE).expect("reads")),
            [
                "action=accept specialtarget=dns",
                "action=accept proto=tcp dstports=443-443 comment=web only",
                "action=accept dst4=192.168.1.0/24",
                "action=drop",
            ]
        );
    }

    #[test]
    fn example_writes_back() {
        let rules = read(EXAMPLE).expect("reads");
        let text = write(&rules);
        assert_eq!(
            text,
            "rules:
  - action: accept
    specialtarget: dns
  - action: accept
    comment: web only
    proto: tcp
    dstports: 443
  - action: accept
    dsthost: 192.168.1.0/24
  - action: drop
"
        );
        assert_eq!(read(&text).expect("reads"), rules);
    }

    #[test]
    fn all_fields_and_aliases() {
        let text = r#"
rules:
  - action: drop
    dst6: "2001:db8::1"
    proto: icmp
    icmptype: 8
    expire: 2063292452
    comment: "a: b, [c]"
  - action: accept
    dstname: qubes-os.org
    proto: udp
    dstports: "1024-2048"
  - {action: accept, dst4: 10.0.0.0/8, proto: tcp, dstports: "080", expire: "0002063292452"}
  - action: accept
    proto: icmp
    icmptype: "08"
"#;
        assert_eq!(
            api(&read(text).expect("reads")),
            [
                "action=drop expire=2063292452 dst6=2001:db8::1/128 proto=icmp icmptype=8 \
                 comment=a: b, [c]",
                "action=accept dsthost=qubes-os.org proto=udp dstports=1024-2048",
                "action=accept expire=0002063292452 dst4=10.0.0.0/8 proto=tcp dstports=80-80",
                "action=accept proto=icmp icmptype=8",
            ]
        );
    }

    #[test]
    fn write_quotes_what_needs_quoting() {
        let rules: Vec<Rule> = [
            "action=accept comment=: leading colon",
            "action=accept comment= leading and trailing space ",
            "action=accept comment=[not a list]",
            "action=accept comment=key: value",
            "action=accept comment=ends with colon:",
            "action=accept comment=123",
            "action=accept comment=1:30",
            "action=accept comment=yes",
            "action=accept comment=Null",
            "action=accept comment=-dash",
            "action=accept comment=.5",
            "action=accept comment=a,b;c",
            "action=accept dsthost=1.2.3",
            "action=accept dsthost=on",
            "action=accept dst6=::1",
            "action=accept dst6=2001:db8::/32 proto=tcp dstports=1024-2048",
            "action=accept expire=0002063292452",
            "action=accept proto=tcp dstports=0",
            "action=accept comment=plain text/with-dashes_and.dots",
        ]
        .iter()
        .map(|l| Rule::from_api_str(l).expect("valid"))
        .collect();
        let text = write(&rules);
        for line in [
            "comment: \": leading colon\"",
            "comment: \" leading and trailing space \"",
            "comment: \"[not a list]\"",
            "comment: \"key: value\"",
            "comment: \"ends with colon:\"",
            "comment: \"123\"",
            "comment: \"1:30\"",
            "comment: \"yes\"",
            "comment: \"Null\"",
            "comment: \"-dash\"",
            "comment: \".5\"",
            "comment: \"a,b;c\"",
            "dsthost: \"1.2.3\"",
            "dsthost: \"on\"",
            "dsthost: \"::1/128\"",
            "dsthost: 2001:db8::/32",
            "dstports: \"1024-2048\"",
            "expire: \"0002063292452\"",
            "dstports: 0",
            "comment: plain text/with-dashes_and.dots",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} not in\n{text}");
        }
        assert_eq!(read(&text).expect("reads"), rules);
    }

    #[test]
    fn empty_list() {
        assert_eq!(write(&[]), "rules: []\n");
        assert_eq!(read("rules: []\n"), Ok(vec![]));
    }

    #[test]
    fn empty_comment_round_trips() {
        let rule = Rule::from_properties([(Property::Action, "drop"), (Property::Comment, "")])
            .expect("valid");
        let text = write(std::slice::from_ref(&rule));
        assert_eq!(text, "rules:\n  - action: drop\n    comment: \"\"\n");
        assert_eq!(read(&text).expect("reads"), [rule]);
    }

    #[test]
    fn unknown_field() {
        assert_eq!(
            err_text("rules:\n  - action: drop\n  - action: accept\n    port: 80\n"),
            "rule 1: unknown field 'port' (known fields: action, dsthost, dst4, dst6, dstname, \
             proto, dstports, icmptype, specialtarget, expire, comment)"
        );
    }

    #[test]
    fn dom0_messages() {
        let text = "rules:\n  - action: drop\n  - action: drop\n  - action: accept\n    \
                    proto: tcp\n    dstports: 100-20\n";
        assert_eq!(
            err_text(text),
            "rule 2: Invalid port range (field 'dstports')"
        );
        assert_eq!(
            read(text),
            Err(YamlError::Rule {
                rule: 2,
                field: Some("dstports".to_string()),
                error: RuleError::new("Invalid port range"),
            })
        );
        assert_eq!(
            err_text("rules:\n  - proto: tcp\n"),
            "rule 0: Required property 'action' not set"
        );
        assert_eq!(
            err_text("rules:\n  - {}\n"),
            "rule 0: Required property 'action' not set"
        );
        assert_eq!(
            err_text("rules:\n  - action: reject\n"),
            "rule 0: reject (field 'action')"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    dstports: 80\n"),
            "rule 0: dstports valid only for 'tcp' and 'udp' protocols"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    proto: tcp\n    dstports: http\n"),
            "rule 0: invalid literal for int() with base 10: 'http' (field 'dstports')"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    proto: tcp\n    dstports: -1\n"),
            "rule 0: invalid literal for int() with base 10: '' (field 'dstports')"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    dst4: 1.2.3.4\n    dsthost: \"::1\"\n"),
            "rule 0: Option 'dsthost' already set (field 'dsthost')"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    dsthost: https://qubes-os.org\n"),
            "rule 0: Too many /: https://qubes-os.org (field 'dsthost')"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    expire: \"+300\"\n"),
            "rule 0: strange characters in rule (field 'expire')"
        );
        // Unquoted, YAML reads +300 as the integer 300: an absolute time in 1970.
        assert_eq!(
            api(&read("rules:\n  - action: accept\n    expire: +300\n").expect("reads")),
            ["action=accept expire=300"]
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    comment: \"a=b\"\n"),
            "rule 0: strange characters comment (field 'comment')"
        );
    }

    #[test]
    fn wrong_types() {
        assert_eq!(
            err_text("rules:\n  - action: [accept]\n"),
            "rule 0: field 'action' must be a string, not a list"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    dsthost: 10\n"),
            "rule 0: field 'dsthost' must be a string, not a number (put it in quotes)"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    comment: true\n"),
            "rule 0: field 'comment' must be a string, not a boolean (put it in quotes)"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    proto: tcp\n    dstports: 1.5\n"),
            "rule 0: field 'dstports' must be a whole number, not 1.5"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    expire:\n"),
            "rule 0: field 'expire' must be an integer or a string, not nothing"
        );
        assert_eq!(
            err_text("rules:\n  - accept\n"),
            "rule 0: expected a mapping of fields such as 'action: accept', found a string"
        );
        assert_eq!(
            err_text("rules:\n  - action: accept\n    1: x\n"),
            "rule 0: field names must be strings, found a number"
        );
    }

    #[test]
    fn structure_errors() {
        assert_eq!(
            err_text(""),
            "the rule file is empty: expected a 'rules:' list"
        );
        assert_eq!(
            err_text("# nothing\n"),
            "the rule file is empty: expected a 'rules:' list"
        );
        assert_eq!(
            err_text("- action: accept\n"),
            "expected a mapping with a 'rules:' list at the top of the file, found a list"
        );
        assert_eq!(
            err_text("rule:\n  - action: accept\n"),
            "unknown top-level key 'rule': a rule file has only 'rules:'"
        );
        assert_eq!(
            err_text("{}"),
            "missing 'rules:' list at the top of the file"
        );
        assert_eq!(
            err_text("rules:\n"),
            "'rules:' is empty; write 'rules: []' for no rules (which blocks all traffic)"
        );
        assert_eq!(
            err_text("rules: accept\n"),
            "'rules:' must be a list of rules, found a string"
        );
    }

    #[test]
    fn syntax_errors() {
        let e = err_text("rules:\n  - action: accept\n   proto: tcp\n");
        assert!(e.starts_with("invalid YAML: "), "{e}");
        assert!(e.contains("line"), "{e}");
        let e = err_text("rules:\n  - action: accept\n    action: drop\n");
        assert!(e.contains("duplicate"), "{e}");
        let e = err_text("rules: []\n---\nrules: []\n");
        assert!(e.starts_with("invalid YAML: "), "{e}");
    }

    /// The example in docs/rule-files.md reads, and its canonical form reads back the same.
    #[test]
    fn documented_example() {
        let doc = include_str!("../../docs/rule-files.md");
        let example = doc
            .split("```yaml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the doc has a yaml example");
        let rules = read(example).expect("the documented example is valid");
        assert_eq!(
            api(&rules),
            [
                "action=accept specialtarget=dns",
                "action=accept proto=icmp",
                "action=accept proto=tcp dstports=443-443 comment=web only",
                "action=accept proto=udp dstports=1024-2048",
                "action=accept dst4=192.168.1.0/24",
                "action=drop dst6=::1/128",
                "action=accept dsthost=updates.example.org proto=tcp dstports=80-80",
                "action=accept proto=icmp icmptype=8",
                "action=accept expire=2063292452 comment=temporary: remove after the update",
                "action=drop",
            ]
        );
        assert_eq!(read(&write(&rules)).expect("reads"), rules);
    }

    #[test]
    fn too_large() {
        let text = "#".repeat(MAX_INPUT + 1);
        assert_eq!(read(&text), Err(YamlError::TooLarge { len: MAX_INPUT + 1 }));
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(read(&text).is_err());
    }
}
