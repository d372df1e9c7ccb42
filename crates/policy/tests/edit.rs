//! Live changes to a config document: each change gives the config a file
//! with that content would give, or the error such a file would get, and
//! never alters the document it was made on.

use std::path::Path;
use vsocket_policy::{parse_document, Change, ChangeError, Config, Direction, Document};

const ORIGIN: &str = "the running config";

const BASE: &str = r#"
[host]
name = "h"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"
[[security_group]]
name = "web"
[[security_group.ingress]]
protocol = "tcp"
ports = "80"
cidr = "10.10.0.0/24"
[[security_group]]
name = "clients"
[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
security_groups = ["clients"]
[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["web"]
"#;

fn base() -> (Document, Config) {
    parse_document(BASE, Path::new("base.toml")).expect("base config is valid")
}

/// A change written as TOML (the admin socket sends the same fields as JSON).
fn change(text: &str) -> Change {
    toml::from_str(text).unwrap_or_else(|e| panic!("change {text}: {e}"))
}

fn apply(doc: &Document, text: &str) -> Result<Config, ChangeError> {
    doc.with_change(&change(text), Path::new(ORIGIN)).map(|(_, config)| config)
}

/// What `BASE` with `replace` done gives when parsed as a file.
fn file_with(from: &str, to: &str) -> Config {
    assert!(BASE.contains(from));
    let edited = BASE.replacen(from, to, 1);
    parse_document(&edited, Path::new(ORIGIN)).expect("edited file is valid").1
}

#[test]
fn adding_a_rule_equals_writing_it_in_the_file() {
    let (doc, _) = base();
    let config = apply(
        &doc,
        "op = \"add_rule\"\ngroup = \"web\"\ndirection = \"ingress\"\n[rule]\nprotocol = \"tcp\"\nports = 443\ngroup = \"clients\"",
    )
    .unwrap();
    let expected = file_with(
        "[[security_group]]\nname = \"clients\"",
        "[[security_group.ingress]]\nprotocol = \"tcp\"\nports = 443\ngroup = \"clients\"\n[[security_group]]\nname = \"clients\"",
    );
    assert_eq!(config, expected);
}

#[test]
fn removing_a_rule_matches_by_meaning() {
    let (doc, _) = base();
    // Written as a number here, a string in the file: the same rule.
    let config = apply(
        &doc,
        "op = \"remove_rule\"\ngroup = \"web\"\ndirection = \"ingress\"\n[rule]\nprotocol = \"tcp\"\nports = 80\ncidr = \"10.10.0.0/24\"",
    )
    .unwrap();
    let web = config.security_group(config.security_group_by_name("web").unwrap());
    assert!(web.ingress.is_empty());

    let missing = apply(
        &doc,
        "op = \"remove_rule\"\ngroup = \"web\"\ndirection = \"egress\"\n[rule]\nprotocol = \"tcp\"\nports = 80\ncidr = \"10.10.0.0/24\"",
    )
    .unwrap_err();
    assert_eq!(missing.to_string(), "security group \"web\" has no such egress rule");
    assert!(matches!(missing, ChangeError::NoSuchRule { direction: Direction::Egress, .. }));
}

#[test]
fn invalid_changes_get_the_file_error_and_leave_the_document_alone() {
    let (doc, before) = base();
    let cases = [
        (
            "op = \"add_rule\"\ngroup = \"web\"\ndirection = \"ingress\"\n[rule]\nprotocol = \"tcp\"\nports = \"99999\"\ncidr = \"10.10.0.0/24\"",
            "the running config: security_group \"web\".ingress[1].ports: port 99999 is outside 1-65535",
        ),
        (
            "op = \"add_rule\"\ngroup = \"web\"\ndirection = \"egress\"\n[rule]\nprotocol = \"tcp\"\ngroup = \"nobody\"",
            "the running config: security_group \"web\".egress[0].group: unknown security group \"nobody\"",
        ),
        (
            "op = \"add_rule\"\ngroup = \"nope\"\ndirection = \"egress\"\n[rule]\nprotocol = \"all\"\ncidr = \"0.0.0.0/0\"",
            "no security group \"nope\"",
        ),
        (
            "op = \"add_membership\"\nguest = \"a\"\ngroup = \"clients\"",
            "the running config: guest[0].security_groups[1]: \"clients\" duplicates guest[0].security_groups[0]",
        ),
        (
            "op = \"add_membership\"\nguest = \"a\"\ngroup = \"ghosts\"",
            "the running config: guest[0].security_groups[1]: unknown security group \"ghosts\"",
        ),
        ("op = \"remove_membership\"\nguest = \"a\"\ngroup = \"web\"", "guest \"a\" is not a member of security group \"web\""),
        (
            "op = \"add_guest\"\n[guest]\nname = \"c\"\nvpc = \"blue\"\naddresses = [\"10.10.0.3\"]",
            "the running config: guest[2].addresses[0]: 10.10.0.3 in VPC \"blue\" duplicates guest[1].addresses[0]",
        ),
        (
            "op = \"add_guest\"\n[guest]\nname = \"c\"\nvpc = \"red\"\naddresses = [\"10.10.0.4\"]",
            "the running config: guest[2].vpc: unknown VPC \"red\"",
        ),
        (
            "op = \"add_guest\"\n[guest]\nname = \"a\"\nvpc = \"blue\"\naddresses = [\"10.10.0.4\"]",
            "the running config: guest[2].name: \"a\" duplicates guest[0].name",
        ),
        ("op = \"remove_guest\"\nname = \"zz\"", "no guest \"zz\""),
    ];
    for (text, message) in cases {
        let err = apply(&doc, text).unwrap_err();
        assert_eq!(err.to_string(), message, "{text}");
        assert_eq!(doc.validate(Path::new(ORIGIN)).unwrap(), before, "the document is unchanged after {text}");
    }
}

#[test]
fn guests_come_and_go() {
    let (doc, _) = base();
    let (doc, config) = doc
        .with_change(
            &change("op = \"add_guest\"\n[guest]\nname = \"c\"\nvpc = \"blue\"\naddresses = [\"10.10.0.4\"]\nsecurity_groups = [\"web\"]\nnetns = \"ns-c\""),
            Path::new(ORIGIN),
        )
        .unwrap();
    let c = config.guest(config.guest_by_name("c").unwrap());
    assert_eq!((c.netns.as_str(), c.addresses.len(), c.groups.len()), ("ns-c", 1, 1));

    let config = apply(&doc, "op = \"remove_guest\"\nname = \"a\"").unwrap();
    assert_eq!(config.guests().map(|(_, g)| g.name.as_str()).collect::<Vec<_>>(), ["b", "c"]);

    let config = apply(&doc, "op = \"remove_membership\"\nguest = \"c\"\ngroup = \"web\"").unwrap();
    assert!(config.guest(config.guest_by_name("c").unwrap()).groups.is_empty());
}

#[test]
fn on_policy_change_is_read_from_the_host_table() {
    use vsocket_policy::PolicyChangeAction;
    let (_, config) = base();
    assert_eq!(config.host().on_policy_change, PolicyChangeAction::Keep);
    let text = BASE.replacen("name = \"h\"", "name = \"h\"\non_policy_change = \"reset\"", 1);
    let (_, config) = parse_document(&text, Path::new("x.toml")).unwrap();
    assert_eq!(config.host().on_policy_change, PolicyChangeAction::Reset);
    let text = BASE.replacen("name = \"h\"", "name = \"h\"\non_policy_change = \"drop\"", 1);
    let err = parse_document(&text, Path::new("x.toml")).unwrap_err().to_string();
    assert!(err.starts_with("x.toml: ") && err.contains("unknown variant `drop`"), "{err}");
}

#[test]
fn guests_added_live_get_their_quotas_or_the_host_defaults() {
    use vsocket_policy::Quotas;
    let text = BASE.replacen("name = \"h\"", "name = \"h\"\ndefault_max_connections = 7", 1);
    let (doc, _) = parse_document(&text, Path::new("q.toml")).unwrap();
    let add = "op = \"add_guest\"\n[guest]\nname = \"c\"\nvpc = \"blue\"\naddresses = [\"10.10.0.4\"]";
    let config = apply(&doc, add).unwrap();
    let c = config.guest(config.guest_by_name("c").unwrap());
    assert_eq!(c.quotas, Quotas { max_connections: 7, ..Quotas::DEFAULT });
    let config = apply(&doc, &format!("{add}\nmax_shared_memory = \"64MiB\"\nmax_channels = 3")).unwrap();
    let c = config.guest(config.guest_by_name("c").unwrap());
    assert_eq!(c.quotas, Quotas { max_connections: 7, max_shared_memory: 64 << 20, max_channels: 3 });
    let err = apply(&doc, &format!("{add}\nmax_connections = 0")).unwrap_err().to_string();
    assert!(err.contains("guest[2].max_connections: 0 is below the minimum of 1"), "{err}");
}

#[test]
fn fabric_hosts_join_and_leave_as_the_file_would_have_them() {
    let fabric = "[fabric]\nkind = \"tcp\"\n[[fabric.host]]\nname = \"h\"\naddress = \"10.99.0.1:7470\"\n";
    let text = BASE.replacen("[[vpc]]", &format!("{fabric}[[vpc]]"), 1);
    let (doc, _) = parse_document(&text, Path::new("base.toml")).unwrap();
    let join = "op = \"add_host\"\nname = \"h2\"\naddress = \"10.99.0.2:7470\"";
    let (joined, config) = doc.with_change(&change(join), Path::new(ORIGIN)).unwrap();
    let hosts = |c: &Config| c.fabric().unwrap().hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
    assert_eq!(hosts(&config), ["h", "h2"]);
    let with_h2 = text.replacen("[[vpc]]", "[[fabric.host]]\nname = \"h2\"\naddress = \"10.99.0.2:7470\"\n[[vpc]]", 1);
    assert_eq!(config, parse_document(&with_h2, Path::new(ORIGIN)).unwrap().1);
    // A guest placed on h2 keeps it in the fabric until the guest goes.
    let placed =
        "op = \"add_guest\"\n[guest]\nname = \"c\"\nvpc = \"blue\"\naddresses = [\"10.10.0.9\"]\nhost = \"h2\"";
    let (placed, _) = joined.with_change(&change(placed), Path::new(ORIGIN)).unwrap();
    let leave = change("op = \"remove_host\"\nname = \"h2\"");
    let refused = placed.with_change(&leave, Path::new(ORIGIN)).unwrap_err().to_string();
    assert!(refused.contains("unknown host \"h2\""), "{refused}");
    let (_, config) = joined.with_change(&leave, Path::new(ORIGIN)).unwrap();
    assert_eq!(hosts(&config), ["h"]);
    // Errors name what is wrong; the document is left as it was.
    let twice = doc.with_change(&change(&join.replace("h2", "h")), Path::new(ORIGIN)).unwrap_err().to_string();
    assert!(twice.contains("fabric.host[1].name"), "{twice}");
    let bad = join.replace("10.99.0.2:7470", "10.99.0.2");
    let bad = doc.with_change(&change(&bad), Path::new(ORIGIN)).unwrap_err().to_string();
    assert!(bad.contains("fabric.host[1].address"), "{bad}");
    let unknown = doc.with_change(&change("op = \"remove_host\"\nname = \"h9\""), Path::new(ORIGIN)).unwrap_err();
    assert_eq!(unknown.to_string(), "no fabric host \"h9\"");
    let (plain, _) = base();
    let no_fabric = plain.with_change(&change(join), Path::new(ORIGIN)).unwrap_err();
    assert_eq!(no_fabric.to_string(), "no fabric: the config has no [fabric] table");
    assert_eq!(hosts(&doc.validate(Path::new(ORIGIN)).unwrap()), ["h"]);
}
