//! dom0's `firewall.xml`: writing version 2 byte for byte as `Firewall.save()` does, and reading
//! version 2 and the Qubes < 4.0 version 1 format as `Firewall.load()` does.
//!
//! Reference: qubes-core-admin `qubes/firewall.py` `Firewall.load`/`save` (both formats and the v1
//! conversion), 1.5 (expired rules are not saved) and 7.2 (v1 conformance cases).
//!
//! Where upstream's loader would act on odd input in a surprising way, this reader refuses it or
//! ignores it explicitly instead (see [`read`]); every file dom0 writes reads back identically.

use std::borrow::Cow;
use std::fmt;

use roxmltree::{Document, Node};

use crate::py;
use crate::rule::{Action, DstHost, Property, Proto, Rule, RuleError, SpecialTarget};

/// Largest file [`read`] accepts, in bytes. A real `firewall.xml` is a few KiB; the bound keeps a
/// hostile or corrupt file from costing unbounded memory.
pub const MAX_INPUT: usize = 4 * 1024 * 1024;

/// Deepest element nesting [`read`] accepts. A `firewall.xml` is 5 deep; roxmltree's parser
/// recurses once per level, so without a bound a deeply nested file would overflow the stack.
pub const MAX_DEPTH: usize = 32;

/// Where in a rule a problem was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmlField {
    /// A version 2 `<property name="...">` (the name as written in the file).
    Property(String),
    /// An attribute of a version 1 `<rule .../>` element (`address`, `netmask`, `port`, ...).
    Attribute(&'static str),
}

/// Why a `firewall.xml` could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmlError {
    /// The input is larger than [`MAX_INPUT`].
    TooLarge { len: usize },
    /// Not well-formed XML; roxmltree's message, which carries `line:column`.
    Malformed(String),
    /// The root `version` attribute is neither `1` nor `2` (dom0's message).
    UnsupportedVersion(String),
    /// The root element does not fit the version.
    WrongRoot {
        version: &'static str,
        expected: &'static str,
        found: String,
    },
    /// The element structure is wrong (missing `<rules>`, an unexpected element, a bad v1
    /// `policy`, a `<property>` without a name).
    Structure { line: u32, message: String },
    /// dom0 refuses a rule. `rule` is the 0-based number of the rule in the resulting list (for
    /// version 1 the two generated DNS/ICMP rules come first, so the first `<rule>` is rule 2).
    Rule {
        rule: usize,
        line: u32,
        field: Option<XmlField>,
        error: RuleError,
    },
}

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XmlError::TooLarge { len } => write!(
                f,
                "firewall.xml is too large: {len} bytes (at most {MAX_INPUT} accepted)"
            ),
            XmlError::Malformed(msg) => write!(f, "malformed firewall.xml: {msg}"),
            XmlError::UnsupportedVersion(v) => {
                write!(f, "Unsupported firewall.xml version: {}", printable(v))
            }
            XmlError::WrongRoot {
                version,
                expected,
                found,
            } => write!(
                f,
                "firewall.xml version {version} must have the root element <{expected}>, \
                 found <{}>",
                printable(found)
            ),
            XmlError::Structure { line, message } => {
                write!(f, "firewall.xml line {line}: {}", printable(message))
            }
            XmlError::Rule {
                rule,
                line,
                field,
                error,
            } => {
                write!(f, "rule {rule}: {}", printable(error.message()))?;
                match field {
                    Some(XmlField::Property(name)) => {
                        write!(f, " (property '{}', line {line})", printable(name))
                    }
                    Some(XmlField::Attribute(name)) => {
                        write!(f, " (attribute '{name}', line {line})")
                    }
                    None => write!(f, " (line {line})"),
                }
            }
        }
    }
}

impl std::error::Error for XmlError {}

/// Text from the file, with control characters escaped so an error message cannot drive a
/// terminal. Ordinary text is returned unchanged, so dom0's messages stay byte-identical.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// `Firewall.save()`: the version 2 file dom0 writes for `rules` at UNIX time `now`.
///
/// Byte-identical to lxml's `ElementTree.write(encoding="UTF-8", pretty_print=True)`: no XML
/// declaration, 2-space indentation, a trailing newline, properties in
/// [`Rule::xml_properties`] order (reference 1.4, 1.6). Expired rules are left out, as `save()`
/// does (reference 1.5). An empty list gives lxml's self-closed `<rules/>`.
pub fn write_v2(rules: &[Rule], now: u64) -> String {
    let mut out = String::from("<firewall version=\"2\">\n");
    let mut live = rules.iter().filter(|r| !r.is_expired(now)).peekable();
    if live.peek().is_none() {
        out.push_str("  <rules/>\n");
    } else {
        out.push_str("  <rules>\n");
        for rule in live {
            out.push_str("    <rule>\n      <properties>\n");
            for (prop, value) in rule.xml_properties() {
                out.push_str("        <property name=\"");
                escape_attr(&mut out, prop.name());
                out.push_str("\">");
                escape_text(&mut out, &value);
                out.push_str("</property>\n");
            }
            out.push_str("      </properties>\n    </rule>\n");
        }
        out.push_str("  </rules>\n");
    }
    out.push_str("</firewall>\n");
    out
}

/// libxml2's escaping of element text (as lxml writes it with `encoding="UTF-8"`).
fn escape_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// libxml2's escaping of attribute values.
fn escape_attr(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// `Firewall.load()` on the text of a `firewall.xml` (reference 1.6).
///
/// The root's `version` attribute defaults to `"1"`; `"1"` reads the Qubes < 4.0 format, `"2"`
/// the current one, anything else is dom0's `Unsupported firewall.xml version: N`. Every value
/// goes through dom0's validation ([`Rule::from_properties`], [`DstHost::parse`]).
///
/// Deliberate differences from upstream's loader, all on input dom0 never writes:
/// - the root element must be `<firewall>` (v2) or `<QubesFirewallRules>` (v1);
/// - comments and processing instructions are skipped (upstream turns a v1 comment into a rule
///   with only an action, i.e. an accept-all or drop-all, and fails on a v2 one);
/// - an element other than `<rule>` inside `<rules>` (v2) or the v1 root is an error (upstream
///   would read it as a rule);
/// - a v2 property with an unknown name is an error (upstream ignores it); the aliases `dst4`,
///   `dst6` and `dstname` are accepted like in the admin API; a property given twice is dom0's
///   API error `Option '<name>' already set` (upstream keeps the last one).
pub fn read(text: &str) -> Result<Vec<Rule>, XmlError> {
    if text.len() > MAX_INPUT {
        return Err(XmlError::TooLarge { len: text.len() });
    }
    check_depth(text)?;
    let doc = Document::parse(text).map_err(|e| XmlError::Malformed(e.to_string()))?;
    let root = doc.root_element();
    match root.attribute("version").unwrap_or("1") {
        "1" => read_v1(&doc, root),
        "2" => read_v2(&doc, root),
        other => Err(XmlError::UnsupportedVersion(other.to_string())),
    }
}

/// Refuses text whose elements nest deeper than [`MAX_DEPTH`], before roxmltree sees it.
///
/// A light scan that follows roxmltree's tokenizer: comments, CDATA sections and processing
/// instructions are skipped, quotes are tracked inside tags, `<x .../>` does not nest. It never
/// under-counts the depth roxmltree would recurse to; where the scan gives up (an unterminated
/// construct, `<` in an attribute value) roxmltree stops with an error at the same place.
fn check_depth(text: &str) -> Result<(), XmlError> {
    let b = text.as_bytes();
    let find = |from: usize, pat: &[u8]| -> Option<usize> {
        b.get(from..)?
            .windows(pat.len())
            .position(|w| w == pat)
            .map(|p| from + p)
    };
    let mut depth = 0usize;
    let mut i = 0usize;
    while let Some(off) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|&c| c == b'<'))
    {
        let start = i + off;
        let rest = b.get(start..).unwrap_or_default();
        let skip_to = |pat: &[u8]| find(start + 1, pat).map(|e| e + pat.len());
        let next = if rest.starts_with(b"<!--") {
            skip_to(b"-->")
        } else if rest.starts_with(b"<![CDATA[") {
            skip_to(b"]]>")
        } else if rest.starts_with(b"<?") {
            skip_to(b"?>")
        } else if rest.starts_with(b"<!") {
            skip_to(b">")
        } else if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            skip_to(b">")
        } else {
            // A start tag: find its `>` outside quoted attribute values.
            let mut quote = None;
            let mut end = None;
            for (j, &c) in rest.iter().enumerate().skip(1) {
                match (quote, c) {
                    (Some(_), b'<') => return Ok(()),
                    (Some(q), c) if c == q => quote = None,
                    (Some(_), _) => {}
                    (None, b'"' | b'\'') => quote = Some(c),
                    (None, b'>') => {
                        end = Some(j);
                        break;
                    }
                    (None, _) => {}
                }
            }
            let Some(end) = end else { return Ok(()) };
            if rest.get(end.wrapping_sub(1)) != Some(&b'/') {
                depth += 1;
                if depth > MAX_DEPTH {
                    let line = 1 + b
                        .get(..start)
                        .unwrap_or_default()
                        .iter()
                        .filter(|&&c| c == b'\n')
                        .count();
                    return Err(XmlError::Structure {
                        line: u32::try_from(line).unwrap_or(u32::MAX),
                        message: format!("elements are nested deeper than {MAX_DEPTH} levels"),
                    });
                }
            }
            Some(start + end + 1)
        };
        match next {
            Some(n) => i = n,
            None => return Ok(()),
        }
    }
    Ok(())
}

fn line_of(doc: &Document<'_>, node: Node<'_, '_>) -> u32 {
    doc.text_pos_at(node.range().start).row
}

/// An element with this local name and no namespace, as lxml's `find('name')` matches.
fn is_named(node: Node<'_, '_>, name: &str) -> bool {
    node.is_element() && node.tag_name().name() == name && node.tag_name().namespace().is_none()
}

fn check_root(
    root: Node<'_, '_>,
    version: &'static str,
    expected: &'static str,
) -> Result<(), XmlError> {
    if is_named(root, expected) {
        Ok(())
    } else {
        Err(XmlError::WrongRoot {
            version,
            expected,
            found: root.tag_name().name().to_string(),
        })
    }
}

/// The element children of `parent`, each of which must be called `name`. Text, comments and
/// processing instructions are skipped.
fn child_elements<'a, 'input>(
    doc: &Document<'input>,
    parent: Node<'a, 'input>,
    name: &str,
) -> Result<Vec<Node<'a, 'input>>, XmlError> {
    let mut out = Vec::new();
    for child in parent.children().filter(Node::is_element) {
        if !is_named(child, name) {
            return Err(XmlError::Structure {
                line: line_of(doc, child),
                message: format!(
                    "unexpected element <{}> in <{}>, expected <{name}>",
                    child.tag_name().name(),
                    parent.tag_name().name()
                ),
            });
        }
        out.push(child);
    }
    Ok(out)
}

/// `Firewall.load_v2`: `rules/rule/properties/property[@name]`, in document order.
fn read_v2(doc: &Document<'_>, root: Node<'_, '_>) -> Result<Vec<Rule>, XmlError> {
    check_root(root, "2", "firewall")?;
    let Some(rules_el) = root.children().find(|n| is_named(*n, "rules")) else {
        return Err(XmlError::Structure {
            line: line_of(doc, root),
            message: "<firewall> has no <rules> element".to_string(),
        });
    };
    let mut rules = Vec::new();
    for (index, rule_el) in child_elements(doc, rules_el, "rule")?
        .into_iter()
        .enumerate()
    {
        rules.push(read_v2_rule(doc, index, rule_el)?);
    }
    Ok(rules)
}

fn read_v2_rule(doc: &Document<'_>, index: usize, rule_el: Node<'_, '_>) -> Result<Rule, XmlError> {
    // PropertyHolder.load_properties: xpath('./properties/property'), value = @ref or text.
    let mut pairs: Vec<(Property, &str, &str, u32)> = Vec::new();
    for props_el in rule_el.children().filter(|n| is_named(*n, "properties")) {
        for prop_el in props_el.children().filter(|n| is_named(*n, "property")) {
            let line = line_of(doc, prop_el);
            let Some(name) = prop_el.attribute("name") else {
                return Err(XmlError::Structure {
                    line,
                    message: format!("rule {index}: <property> without a name attribute"),
                });
            };
            let rule_err = |error: RuleError| XmlError::Rule {
                rule: index,
                line,
                field: Some(XmlField::Property(name.to_string())),
                error,
            };
            let Some(prop) = Property::from_key(name) else {
                return Err(rule_err(RuleError::new("Unknown firewall option")));
            };
            if pairs.iter().any(|(p, ..)| *p == prop) {
                return Err(rule_err(RuleError::new(format!(
                    "Option '{}' already set",
                    prop.name()
                ))));
            }
            let value = match prop_el.attribute("ref") {
                Some(r) if !r.is_empty() => r,
                _ => prop_el.text().unwrap_or(""),
            };
            pairs.push((prop, name, value, line));
        }
    }
    let props: Vec<(Property, &str)> = pairs.iter().map(|(p, _, v, _)| (*p, *v)).collect();
    build_rule(&props).map_err(|(at, error)| {
        let (field, line) = match at.and_then(|i| pairs.get(i)) {
            Some((_, name, _, line)) => (Some(XmlField::Property((*name).to_string())), *line),
            None => (None, line_of(doc, rule_el)),
        };
        XmlError::Rule {
            rule: index,
            line,
            field,
            error,
        }
    })
}

/// [`Rule::from_properties`], and on failure the index in `props` of the value dom0 refused
/// (`None` for the cross-field checks).
pub(crate) fn build_rule(props: &[(Property, &str)]) -> Result<Rule, (Option<usize>, RuleError)> {
    Rule::from_properties(props.iter().copied()).map_err(|error| {
        // from_properties validates the values in order, then the cross-field constraints:
        // replay the values one by one to find which of them it refused.
        let mut scratch = Rule::default();
        let at = props.iter().position(|(p, v)| scratch.set(*p, v).is_err());
        (at, error)
    })
}

/// `Firewall.load_v1` (reference 1.6, 7.2).
fn read_v1(doc: &Document<'_>, root: Node<'_, '_>) -> Result<Vec<Rule>, XmlError> {
    check_root(root, "1", "QubesFirewallRules")?;
    // `assert policy_v1 in ('allow', 'deny')`
    let policy = match root.attribute("policy") {
        Some(p @ ("allow" | "deny")) => p,
        other => {
            return Err(XmlError::Structure {
                line: line_of(doc, root),
                message: match other {
                    Some(p) => format!(
                        "<QubesFirewallRules> policy must be \"allow\" or \"deny\", not \"{p}\""
                    ),
                    None => "<QubesFirewallRules> has no policy attribute".to_string(),
                },
            })
        }
    };
    let translate = |key: &str| {
        if root.attribute(key).unwrap_or(policy) == "allow" {
            Action::Accept
        } else {
            Action::Drop
        }
    };
    let mut rules = vec![
        Rule {
            action: Some(translate("dns")),
            specialtarget: Some(SpecialTarget::Dns),
            ..Rule::default()
        },
        Rule {
            action: Some(translate("icmp")),
            proto: Some(Proto::Icmp),
            ..Rule::default()
        },
    ];
    let policy_accept = policy == "allow";
    let rule_action = if policy_accept {
        Action::Drop
    } else {
        Action::Accept
    };
    for rule_el in child_elements(doc, root, "rule")? {
        let index = rules.len();
        let line = line_of(doc, rule_el);
        let rule = rule_from_v1(rule_el, rule_action).map_err(|(attr, error)| XmlError::Rule {
            rule: index,
            line,
            field: attr.map(XmlField::Attribute),
            error,
        })?;
        rules.push(rule);
    }
    if policy_accept {
        rules.push(Rule::accept_all());
    }
    Ok(rules)
}

/// `Rule.from_xml_v1`: one `<rule address= netmask= proto= port= toport= expire=/>`.
///
/// Values are validated in upstream's order: `int(netmask)`, `DstHost(address, netmask)`, then
/// `Rule(action, dsthost, dstports, proto, expire)` and the cross-field checks.
fn rule_from_v1(
    el: Node<'_, '_>,
    action: Action,
) -> Result<Rule, (Option<&'static str>, RuleError)> {
    // Python truthiness: an empty attribute counts as absent.
    let attr = |name: &str| el.attribute(name).filter(|v| !v.is_empty());
    let netmask: i128 = match el.attribute("netmask") {
        None => 32,
        Some(text) => {
            let n = py::int(text).map_err(|m| (Some("netmask"), RuleError(m)))?;
            let magnitude = i128::try_from(n.magnitude).unwrap_or(i128::MAX);
            if n.negative {
                -magnitude
            } else {
                magnitude
            }
        }
    };
    let mut rule = Rule {
        action: Some(action),
        ..Rule::default()
    };
    if let Some(address) = attr("address") {
        rule.dsthost =
            Some(DstHost::parse(address, Some(netmask)).map_err(|e| (Some("address"), e))?);
    }
    let dstports = match (attr("port"), attr("toport")) {
        (Some(port), Some(toport)) => Some(format!("{port}-{toport}")),
        (Some(port), None) => Some(port.to_string()),
        _ => None,
    };
    let mut proto = attr("proto");
    // Backward compatibility: the protocol defaults to TCP when a port is given.
    if dstports.is_some() && proto.is_none() {
        proto = Some("tcp");
    }
    if proto == Some("any") {
        proto = None;
    }
    if let Some(ports) = &dstports {
        rule.set(Property::Dstports, ports)
            .map_err(|e| (Some("port"), e))?;
    }
    if let Some(proto) = proto {
        rule.set(Property::Proto, proto)
            .map_err(|e| (Some("proto"), e))?;
    }
    if let Some(expire) = attr("expire") {
        rule.set(Property::Expire, expire)
            .map_err(|e| (Some("expire"), e))?;
    }
    rule.check().map_err(|e| (None, e))?;
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(Rule::api_form).collect()
    }

    fn rules_of(lines: &[&str]) -> Vec<Rule> {
        lines
            .iter()
            .map(|l| Rule::from_api_str(l).expect("valid rule"))
            .collect()
    }

    /// The example of reference section 1.6, verbatim.
    const V2_EXAMPLE: &str = r#"<firewall version="2">
  <rules>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="comment">Allow LAN</property>
        <property name="expire">2063292452</property>
        <property name="dsthost">192.168.0.0/24</property>
        <property name="proto">tcp</property>
        <property name="dstports">443</property>
      </properties>
    </rule>
  </rules>
</firewall>
"#;

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn v2_example_round_trips_byte_exact() {
        let rules = read(V2_EXAMPLE).expect("reads");
        assert_eq!(
            api(&rules),
            [
                "action=accept expire=2063292452 dst4=192.168.0.0/24 proto=tcp dstports=443-443 \
              comment=Allow LAN"
            ]
        );
        assert_eq!(write_v2(&rules, NOW), V2_EXAMPLE);
    }

    #[test]
    fn empty_list_is_self_closed() {
        assert_eq!(
            write_v2(&[], NOW),
            "<firewall version=\"2\">\n  <rules/>\n</firewall>\n"
        );
        assert_eq!(read(&write_v2(&[], NOW)), Ok(vec![]));
        assert_eq!(
            read("<firewall version=\"2\"><rules></rules></firewall>"),
            Ok(vec![])
        );
    }

    #[test]
    fn expired_rules_are_not_saved() {
        let rules = rules_of(&["action=accept expire=1000 proto=udp", "action=drop"]);
        let text = write_v2(&rules, NOW);
        assert_eq!(api(&read(&text).expect("reads")), ["action=drop"]);
        // All expired: the empty form.
        assert_eq!(write_v2(&rules[..1], NOW), write_v2(&[], NOW));
        // Not yet expired at an earlier time.
        assert_eq!(read(&write_v2(&rules, 999)).expect("reads"), rules);
    }

    /// The rule list of upstream's test_571 (reference 2.1), as dom0 saves it: the expired rule
    /// is left out.
    #[test]
    fn writes_test_571_rules() {
        let rules = rules_of(&[
            "action=accept proto=tcp dstports=1-1024",
            "action=drop proto=icmp comment=No ICMP",
            "action=drop proto=udp expire=1499450306",
            "action=drop proto=udp expire=2099450306",
            "action=accept",
        ]);
        let expected = r#"<firewall version="2">
  <rules>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="proto">tcp</property>
        <property name="dstports">1-1024</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">drop</property>
        <property name="comment">No ICMP</property>
        <property name="proto">icmp</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">drop</property>
        <property name="expire">2099450306</property>
        <property name="proto">udp</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">accept</property>
      </properties>
    </rule>
  </rules>
</firewall>
"#;
        assert_eq!(write_v2(&rules, NOW), expected);
        let back = read(expected).expect("reads");
        assert_eq!(
            api(&back),
            [
                "action=accept proto=tcp dstports=1-1024",
                "action=drop proto=icmp comment=No ICMP",
                "action=drop expire=2099450306 proto=udp",
                "action=accept",
            ]
        );
    }

    #[test]
    fn writes_every_property_in_xml_order() {
        let rules = rules_of(&[
            "action=drop dst6=2001:db8::1 proto=icmp icmptype=8 expire=2063292452 comment=a: b [c]",
            "action=accept dsthost=qubes-os.org proto=udp specialtarget=dns dstports=53",
        ]);
        let text = write_v2(&rules, NOW);
        assert!(text.contains(
            "        <property name=\"action\">drop</property>\n        \
             <property name=\"comment\">a: b [c]</property>\n        \
             <property name=\"expire\">2063292452</property>\n        \
             <property name=\"dsthost\">2001:db8::1/128</property>\n        \
             <property name=\"proto\">icmp</property>\n        \
             <property name=\"icmptype\">8</property>\n"
        ));
        assert!(text.contains(
            "        <property name=\"dsthost\">qubes-os.org</property>\n        \
             <property name=\"proto\">udp</property>\n        \
             <property name=\"specialtarget\">dns</property>\n        \
             <property name=\"dstports\">53</property>\n"
        ));
        assert_eq!(read(&text).expect("reads"), rules);
    }

    #[test]
    fn escapes_like_lxml() {
        let mut s = String::new();
        escape_text(&mut s, "a&b<c>\"d'\r\t\n");
        assert_eq!(s, "a&amp;b&lt;c&gt;\"d'&#13;\t\n");
        let mut s = String::new();
        escape_attr(&mut s, "a&b<c>\"d'\r\t\n");
        assert_eq!(s, "a&amp;b&lt;c&gt;&quot;d'&#13;&#9;&#10;");
    }

    #[test]
    fn empty_comment_is_written_open_and_read_back() {
        let rule = Rule::from_properties([(Property::Action, "accept"), (Property::Comment, "")])
            .expect("valid");
        let text = write_v2(std::slice::from_ref(&rule), NOW);
        assert!(text.contains("<property name=\"comment\"></property>"));
        assert_eq!(read(&text).expect("reads"), [rule]);
    }

    #[test]
    fn comment_spaces_are_kept() {
        for line in [
            "action=accept comment= ",
            "action=accept comment=   ",
            "action=accept comment=  two leading, two trailing  ",
        ] {
            let rules = rules_of(&[line]);
            assert_eq!(
                read(&write_v2(&rules, NOW)).expect("reads"),
                rules,
                "{line}"
            );
        }
    }

    #[test]
    fn v2_accepts_declaration_comments_aliases_and_ref() {
        let text = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- written by hand -->
<firewall version="2">
  <rules>
    <!-- LAN -->
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="dst4">10.0.0.0/8</property>
        <property name="proto" ref="udp"/>
      </properties>
    </rule>
  </rules>
</firewall>"#;
        assert_eq!(
            api(&read(text).expect("reads")),
            ["action=accept dst4=10.0.0.0/8 proto=udp"]
        );
    }

    #[test]
    fn v2_property_order_does_not_matter() {
        let text = "<firewall version='2'><rules><rule><properties>\
            <property name='dstports'>80</property><property name='proto'>tcp</property>\
            <property name='action'>drop</property></properties></rule></rules></firewall>";
        assert_eq!(
            api(&read(text).expect("reads")),
            ["action=drop proto=tcp dstports=80-80"]
        );
    }

    // ------------------------------------------------------------------ v1 (reference 7.2)

    fn v1(policy: &str, rules: &str) -> String {
        format!("<QubesFirewallRules policy=\"{policy}\" dns=\"allow\" icmp=\"allow\">{rules}</QubesFirewallRules>")
    }

    #[test]
    fn v1_test_003() {
        let text = r#"<QubesFirewallRules dns="allow" icmp="allow" policy="deny" yumProxy="allow">
  <rule address="192.168.0.0" netmask="24" port="80" proto="tcp"/>
  <rule address="qubes-os.org" port="443" proto="tcp"/>
</QubesFirewallRules>
"#;
        assert_eq!(
            api(&read(text).expect("reads")),
            [
                "action=accept specialtarget=dns",
                "action=accept proto=icmp",
                "action=accept dst4=192.168.0.0/24 proto=tcp dstports=80-80",
                "action=accept dsthost=qubes-os.org proto=tcp dstports=443-443",
            ]
        );
    }

    #[test]
    fn v1_conformance_cases() {
        // policy deny: rules accept.
        let rules = read(&v1(
            "deny",
            r#"<rule address="192.168.0.0" proto="tcp" netmask="24" port="443"/>"#,
        ))
        .expect("reads");
        let r = &rules[2];
        assert_eq!(r.action, Some(Action::Accept));
        assert_eq!(
            r.dsthost.as_ref().map(DstHost::as_str),
            Some("192.168.0.0/24")
        );
        assert_eq!(r.proto, Some(Proto::Tcp));
        assert_eq!(r.dstports.map(|p| p.short()), Some("443".to_string()));

        // policy allow: rules drop, and a final accept-all.
        let rules = read(&v1(
            "allow",
            r#"<rule address="qubes-os.org" proto="tcp" port="443" toport="1024"/>"#,
        ))
        .expect("reads");
        assert_eq!(
            api(&rules),
            [
                "action=accept specialtarget=dns",
                "action=accept proto=icmp",
                "action=drop dsthost=qubes-os.org proto=tcp dstports=443-1024",
                "action=accept",
            ]
        );

        let rules = read(&v1(
            "deny",
            r#"<rule address="192.168.0.0" netmask="24" expire="1463292452"/>"#,
        ))
        .expect("reads");
        let r = &rules[2];
        assert_eq!(
            r.dsthost.as_ref().map(DstHost::as_str),
            Some("192.168.0.0/24")
        );
        assert_eq!(r.expire.as_ref().map(|e| e.as_str()), Some("1463292452"));
        assert_eq!(r.proto, None);
    }

    #[test]
    fn v1_dns_icmp_default_to_policy_and_any_proto() {
        let rules = read(
            r#"<QubesFirewallRules policy="allow" icmp="deny">
                 <rule address="10.0.0.1" proto="any"/>
                 <rule address="2001:db8::" netmask="0" proto="udp" port="53"/>
                 <rule address="10.1.0.0" netmask="16"/>
               </QubesFirewallRules>"#,
        )
        .expect("reads");
        assert_eq!(
            api(&rules),
            [
                "action=accept specialtarget=dns",
                "action=drop proto=icmp",
                "action=drop dst4=10.0.0.1/32",
                "action=drop dst6=2001:db8::/128 proto=udp dstports=53-53",
                "action=drop dst4=10.1.0.0/16",
                "action=accept",
            ]
        );
        // No rules at all, policy deny: just DNS and ICMP.
        assert_eq!(
            api(&read(r#"<QubesFirewallRules policy="deny" dns="x"/>"#).expect("reads")),
            ["action=drop specialtarget=dns", "action=drop proto=icmp"]
        );
    }

    // ------------------------------------------------------------------ errors

    fn err_text(text: &str) -> String {
        match read(text) {
            Ok(rules) => panic!("expected an error, got {:?}", api(&rules)),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_version() {
        assert_eq!(
            err_text("<firewall version=\"3\"><rules/></firewall>"),
            "Unsupported firewall.xml version: 3"
        );
        assert_eq!(
            read("<firewall version=\"3\"/>"),
            Err(XmlError::UnsupportedVersion("3".to_string()))
        );
    }

    #[test]
    fn garbage() {
        for text in [
            "",
            "not xml",
            "<firewall version=\"2\"><rules>",
            "<a></b>",
            "\u{0}",
        ] {
            let e = err_text(text);
            assert!(e.starts_with("malformed firewall.xml: "), "{e}");
        }
        assert!(err_text("<a></b>").contains("1:"), "position is named");
    }

    #[test]
    fn wrong_root_or_structure() {
        assert_eq!(
            err_text("<firewall><rules/></firewall>"),
            "firewall.xml version 1 must have the root element <QubesFirewallRules>, found <firewall>"
        );
        assert_eq!(
            err_text("<QubesFirewallRules version=\"2\"/>"),
            "firewall.xml version 2 must have the root element <firewall>, found <QubesFirewallRules>"
        );
        assert_eq!(
            err_text("<firewall version=\"2\">\n</firewall>"),
            "firewall.xml line 1: <firewall> has no <rules> element"
        );
        assert_eq!(
            err_text("<firewall version=\"2\"><rules>\n<rul/></rules></firewall>"),
            "firewall.xml line 2: unexpected element <rul> in <rules>, expected <rule>"
        );
        assert_eq!(
            err_text("<QubesFirewallRules policy=\"block\"/>"),
            "firewall.xml line 1: <QubesFirewallRules> policy must be \"allow\" or \"deny\", not \"block\""
        );
        assert_eq!(
            err_text("<QubesFirewallRules/>"),
            "firewall.xml line 1: <QubesFirewallRules> has no policy attribute"
        );
    }

    fn v2_rule(props: &str) -> String {
        format!("<firewall version=\"2\">\n<rules>\n<rule>\n<properties>\n{props}</properties>\n</rule>\n</rules>\n</firewall>\n")
    }

    #[test]
    fn bad_property_values_carry_dom0_message() {
        let e = read(&v2_rule(
            "<property name=\"action\">accept</property>\n\
             <property name=\"proto\">tcp</property>\n\
             <property name=\"dstports\">100-20</property>\n",
        ))
        .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "rule 0: Invalid port range (property 'dstports', line 7)"
        );
        assert_eq!(
            e,
            XmlError::Rule {
                rule: 0,
                line: 7,
                field: Some(XmlField::Property("dstports".to_string())),
                error: RuleError::new("Invalid port range"),
            }
        );
        assert_eq!(
            err_text(&v2_rule("<property name=\"action\">reject</property>\n")),
            "rule 0: reject (property 'action', line 5)"
        );
        assert_eq!(
            err_text(&v2_rule(
                "<property name=\"dsthost\">https://x</property>\n"
            )),
            "rule 0: Too many /: https://x (property 'dsthost', line 5)"
        );
        // Cross-field checks name the rule's line.
        assert_eq!(
            err_text(&v2_rule("<property name=\"proto\">tcp</property>\n")),
            "rule 0: Required property 'action' not set (line 3)"
        );
        assert_eq!(
            err_text(&v2_rule(
                "<property name=\"action\">drop</property>\n<property name=\"dstports\">80</property>\n"
            )),
            "rule 0: dstports valid only for 'tcp' and 'udp' protocols (line 3)"
        );
        // An empty rule element.
        assert_eq!(
            err_text("<firewall version=\"2\"><rules><rule/></rules></firewall>"),
            "rule 0: Required property 'action' not set (line 1)"
        );
    }

    #[test]
    fn unknown_duplicate_and_nameless_properties() {
        assert_eq!(
            err_text(&v2_rule("<property name=\"port\">80</property>\n")),
            "rule 0: Unknown firewall option (property 'port', line 5)"
        );
        assert_eq!(
            err_text(&v2_rule(
                "<property name=\"action\">drop</property>\n<property name=\"action\">accept</property>\n"
            )),
            "rule 0: Option 'action' already set (property 'action', line 6)"
        );
        assert_eq!(
            err_text(&v2_rule(
                "<property name=\"dst4\">1.2.3.4</property>\n<property name=\"dsthost\">x</property>\n"
            )),
            "rule 0: Option 'dsthost' already set (property 'dsthost', line 6)"
        );
        assert_eq!(
            err_text(&v2_rule("<property>accept</property>\n")),
            "firewall.xml line 5: rule 0: <property> without a name attribute"
        );
    }

    #[test]
    fn second_rule_is_numbered_one() {
        let text = "<firewall version=\"2\"><rules>\
            <rule><properties><property name=\"action\">drop</property></properties></rule>\
            <rule><properties><property name=\"action\">drop</property>\
            <property name=\"expire\">+300</property></properties></rule>\
            </rules></firewall>";
        assert_eq!(
            err_text(text),
            "rule 1: strange characters in rule (property 'expire', line 1)"
        );
    }

    #[test]
    fn v1_errors() {
        assert_eq!(
            err_text(&v1("deny", "\n<rule address=\"10.0.0.0\" netmask=\"x\"/>")),
            "rule 2: invalid literal for int() with base 10: 'x' (attribute 'netmask', line 2)"
        );
        assert_eq!(
            err_text(&v1("deny", "<rule address=\"10.0.0.0\" netmask=\"33\"/>")),
            "rule 2: netmask for IPv4 must be between 0 and 32 (attribute 'address', line 1)"
        );
        assert_eq!(
            err_text(&v1("deny", "<rule address=\"10.0.0.0\" netmask=\"-1\"/>")),
            "rule 2: netmask for IPv4 must be between 0 and 32 (attribute 'address', line 1)"
        );
        assert_eq!(
            err_text(&v1("deny", "<rule proto=\"any\" port=\"80\"/>")),
            "rule 2: dstports valid only for 'tcp' and 'udp' protocols (line 1)"
        );
        assert_eq!(
            err_text(&v1("deny", "<rule port=\"80\" toport=\"70\"/>")),
            "rule 2: Invalid port range (attribute 'port', line 1)"
        );
        assert_eq!(
            err_text(&v1("deny", "<rule proto=\"sctp\"/>")),
            "rule 2: sctp (attribute 'proto', line 1)"
        );
        assert_eq!(
            err_text(&v1("allow", "<rule/><rule expire=\"soon\"/>")),
            "rule 3: bad expiration time (attribute 'expire', line 1)"
        );
        assert_eq!(
            err_text(&v1("deny", "<!-- c --><allow/>")),
            "firewall.xml line 1: unexpected element <allow> in <QubesFirewallRules>, expected <rule>"
        );
    }

    #[test]
    fn control_characters_are_escaped_in_messages() {
        let e = err_text(&v2_rule("<property name=\"a&#10;b\">x</property>\n"));
        assert!(!e.contains('\n'), "{e:?}");
        assert!(e.contains("'a\\nb'"), "{e:?}");
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = |n: usize| format!("{}{}", "<a>".repeat(n), "</a>".repeat(n));
        assert!(matches!(
            read(&deep(MAX_DEPTH)),
            Err(XmlError::WrongRoot { .. })
        ));
        assert_eq!(
            err_text(&deep(MAX_DEPTH + 1)),
            "firewall.xml line 1: elements are nested deeper than 32 levels"
        );
        // Would overflow the stack in roxmltree.
        assert!(read(&deep(200_000)).is_err());
        // Self-closed elements, comments, CDATA, PIs and quoted `>` / `/>` do not nest.
        let flat = format!(
            "<firewall version='2'><rules>{}</rules></firewall>",
            "<x a='/>' b=\"'>\"/><!-- <a> --><![CDATA[<a>]]><?pi <a>?>".repeat(100)
        );
        assert_eq!(
            err_text(&flat),
            "firewall.xml line 1: unexpected element <x> in <rules>, expected <rule>"
        );
        assert_eq!(check_depth(V2_EXAMPLE), Ok(()));
        assert_eq!(check_depth("<a b='<'><a><a>"), Ok(()));
        assert_eq!(check_depth("<a><!-- unterminated <a>"), Ok(()));
    }

    #[test]
    fn too_large() {
        let text = " ".repeat(MAX_INPUT + 1);
        assert_eq!(read(&text), Err(XmlError::TooLarge { len: MAX_INPUT + 1 }));
    }
}
