//! The config file: what it accepts, its defaults, and how it reports errors.

use std::error::Error as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use vsocket_policy::config::{parse, Problem};
use vsocket_policy::{
    load, ConfigError, DenyAction, FlowLogConfig, HostConfig, Peer, PolicyChangeAction, PortRange, Protocol,
    ProtocolFilter, Quotas,
};

const ORIGIN: &str = "/etc/vsocket/lab.toml";

/// A valid file: `host_extra` goes into `[host]`, `rest` after everything.
fn config_text(host_extra: &str, rest: &str) -> String {
    format!(
        r#"
[host]
name = "host1"
{host_extra}

[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[vpc]]
name = "green"
cidr = "10.10.0.0/16"

[[security_group]]
name = "web"
[[security_group.ingress]]
protocol = "tcp"
ports = "80"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
security_groups = ["web"]

{rest}
"#
    )
}

fn parse_text(text: &str) -> Result<vsocket_policy::Config, ConfigError> {
    parse(text, Path::new(ORIGIN))
}

/// A `[[security_group]]` named "extra" with one ingress rule made of `body`.
fn group_with_rule(body: &str) -> String {
    format!("[[security_group]]\nname = \"extra\"\n[[security_group.ingress]]\n{body}\n")
}

/// A second guest, "b", with the given extra lines.
fn guest_b(body: &str) -> String {
    format!("[[guest]]\nname = \"b\"\n{body}\n")
}

#[test]
fn invalid_content_names_file_field_and_problem() {
    // (what, host_extra, rest, field, problem)
    let cases: Vec<(&str, &str, String, &str, Problem)> = vec![
        (
            "unknown vpc",
            "",
            guest_b("vpc = \"red\"\naddresses = [\"10.10.0.3\"]"),
            "guest[1].vpc",
            Problem::UnknownVpc("red".into()),
        ),
        (
            "address outside the vpc",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\", \"10.10.1.3\"]"),
            "guest[1].addresses[1]",
            Problem::AddressOutsideVpc {
                addr: Ipv4Addr::new(10, 10, 1, 3),
                vpc: "blue".into(),
                cidr: "10.10.0.0/24".parse().unwrap(),
            },
        ),
        (
            "address used twice in one vpc",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.2\"]"),
            "guest[1].addresses[0]",
            Problem::DuplicateAddress {
                addr: Ipv4Addr::new(10, 10, 0, 2),
                vpc: "blue".into(),
                first: "guest[0].addresses[0]".into(),
            },
        ),
        (
            "address used twice by one guest",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\", \"10.10.0.3\"]"),
            "guest[1].addresses[1]",
            Problem::DuplicateAddress {
                addr: Ipv4Addr::new(10, 10, 0, 3),
                vpc: "blue".into(),
                first: "guest[1].addresses[0]".into(),
            },
        ),
        (
            "malformed address",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.300\"]"),
            "guest[1].addresses[0]",
            Problem::BadAddress("10.10.0.300".into()),
        ),
        (
            "guest without addresses",
            "",
            guest_b("vpc = \"blue\"\naddresses = []"),
            "guest[1].addresses",
            Problem::NoAddresses,
        ),
        (
            "guest in an unknown security group",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nsecurity_groups = [\"web\", \"db\"]"),
            "guest[1].security_groups[1]",
            Problem::UnknownSecurityGroup("db".into()),
        ),
        (
            "guest lists a security group twice",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nsecurity_groups = [\"web\", \"web\"]"),
            "guest[1].security_groups[1]",
            Problem::Duplicate { value: "web".into(), first: "guest[1].security_groups[0]".into() },
        ),
        (
            "duplicate guest name",
            "",
            "[[guest]]\nname = \"a\"\nvpc = \"green\"\naddresses = [\"10.10.9.9\"]".into(),
            "guest[1].name",
            Problem::Duplicate { value: "a".into(), first: "guest[0].name".into() },
        ),
        (
            "duplicate netns",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nnetns = \"vs-a\""),
            "guest[1].netns",
            Problem::Duplicate { value: "vs-a".into(), first: "guest[0].netns".into() },
        ),
        (
            "netns that is a path",
            "",
            guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nnetns = \"../etc\""),
            "guest[1].netns",
            Problem::BadNetns("../etc".into()),
        ),
        (
            "guest name too long for an interface",
            "",
            "[[guest]]\nname = \"abcdefghijklmnop\"\nvpc = \"blue\"\naddresses = [\"10.10.0.3\"]".into(),
            "guest[1].name",
            Problem::NameTooLong { name: "abcdefghijklmnop".into(), max: 15 },
        ),
        (
            "upper-case name",
            "",
            "[[vpc]]\nname = \"Red\"\ncidr = \"10.0.0.0/8\"".into(),
            "vpc[2].name",
            Problem::BadName("Red".into()),
        ),
        ("empty name", "", "[[security_group]]\nname = \"\"".into(), "security_group[1].name", Problem::Empty),
        (
            "duplicate vpc name",
            "",
            "[[vpc]]\nname = \"blue\"\ncidr = \"10.0.0.0/8\"".into(),
            "vpc[2].name",
            Problem::Duplicate { value: "blue".into(), first: "vpc[0].name".into() },
        ),
        (
            "vpc cidr with host bits",
            "",
            "[[vpc]]\nname = \"red\"\ncidr = \"10.0.0.1/8\"".into(),
            "vpc[2].cidr",
            Problem::BadCidr(vsocket_policy::cidr::CidrError::HostBitsSet {
                given: "10.0.0.1/8".into(),
                suggested: "10.0.0.0/8".parse().unwrap(),
            }),
        ),
        (
            "backwards port range",
            "",
            group_with_rule("protocol = \"tcp\"\nports = \"2000-1000\"\ncidr = \"0.0.0.0/0\""),
            "security_group \"extra\".ingress[0].ports",
            Problem::BackwardPortRange { lo: 2000, hi: 1000 },
        ),
        (
            "port zero",
            "",
            group_with_rule("protocol = \"tcp\"\nports = \"0-10\"\ncidr = \"0.0.0.0/0\""),
            "security_group \"extra\".ingress[0].ports",
            Problem::PortOutOfRange("0".into()),
        ),
        (
            "port above 65535",
            "",
            group_with_rule("protocol = \"udp\"\nports = 70000\ncidr = \"0.0.0.0/0\""),
            "security_group \"extra\".ingress[0].ports",
            Problem::PortOutOfRange("70000".into()),
        ),
        (
            "port by service name",
            "",
            group_with_rule("protocol = \"tcp\"\nports = \"http\"\ncidr = \"0.0.0.0/0\""),
            "security_group \"extra\".ingress[0].ports",
            Problem::BadPorts("http".into()),
        ),
        (
            "ports on icmp",
            "",
            group_with_rule("protocol = \"icmp\"\nports = \"8\"\ncidr = \"0.0.0.0/0\""),
            "security_group \"extra\".ingress[0].ports",
            Problem::PortsNotApplicable(ProtocolFilter::Only(Protocol::Icmp)),
        ),
        (
            "both cidr and group",
            "",
            group_with_rule("protocol = \"tcp\"\ncidr = \"0.0.0.0/0\"\ngroup = \"web\""),
            "security_group \"extra\".ingress[0]",
            Problem::BothPeers,
        ),
        (
            "neither cidr nor group",
            "",
            group_with_rule("protocol = \"tcp\""),
            "security_group \"extra\".ingress[0]",
            Problem::MissingPeer,
        ),
        (
            "unknown peer group",
            "",
            group_with_rule("protocol = \"tcp\"\ngroup = \"clients\""),
            "security_group \"extra\".ingress[0].group",
            Problem::UnknownSecurityGroup("clients".into()),
        ),
        (
            "rule cidr malformed",
            "",
            group_with_rule("protocol = \"tcp\"\ncidr = \"10.0.0.0/40\""),
            "security_group \"extra\".ingress[0].cidr",
            Problem::BadCidr(vsocket_policy::cidr::CidrError::BadPrefixLength("40".into())),
        ),
        (
            "ring size not a power of two",
            "ring_size = 100000",
            String::new(),
            "host.ring_size",
            Problem::BadRingSize(100_000),
        ),
        ("ring size below a page", "ring_size = 2048", String::new(), "host.ring_size", Problem::BadRingSize(2048)),
        (
            "ring size above 64 MiB",
            "ring_size = 134217728",
            String::new(),
            "host.ring_size",
            Problem::BadRingSize(134_217_728),
        ),
        (
            "ring size beyond u32",
            "ring_size = 8589934592",
            String::new(),
            "host.ring_size",
            Problem::BadRingSize(8_589_934_592),
        ),
        (
            "relative flow_log",
            "flow_log = \"flow.log\"",
            String::new(),
            "host.flow_log",
            Problem::RelativePath("flow.log".into()),
        ),
        (
            "flow log rotated too small",
            "flow_log = \"/var/log/flow.log\"\nflow_log_max_bytes = 100",
            String::new(),
            "host.flow_log_max_bytes",
            Problem::FlowLogTooSmall(100),
        ),
        (
            "flow log keeping nothing",
            "flow_log = \"/var/log/flow.log\"\nflow_log_keep = 0",
            String::new(),
            "host.flow_log_keep",
            Problem::BadFlowLogKeep(0),
        ),
        (
            "flow log keeping too much",
            "flow_log = \"/var/log/flow.log\"\nflow_log_keep = 1001",
            String::new(),
            "host.flow_log_keep",
            Problem::BadFlowLogKeep(1001),
        ),
        (
            "negative flow_log_keep",
            "flow_log = \"/var/log/flow.log\"\nflow_log_keep = -3",
            String::new(),
            "host.flow_log_keep",
            Problem::BadFlowLogKeep(-3),
        ),
        (
            "rotation size without a flow log",
            "flow_log_max_bytes = 1048576",
            String::new(),
            "host.flow_log_max_bytes",
            Problem::NeedsFlowLog,
        ),
        ("keep without a flow log", "flow_log_keep = 3", String::new(), "host.flow_log_keep", Problem::NeedsFlowLog),
        (
            "metrics without a port",
            "metrics = \"127.0.0.1\"",
            String::new(),
            "host.metrics",
            Problem::BadListenAddress("127.0.0.1".into()),
        ),
        (
            "metrics on port 0",
            "metrics = \"127.0.0.1:0\"",
            String::new(),
            "host.metrics",
            Problem::BadListenAddress("127.0.0.1:0".into()),
        ),
        (
            "metrics by host name",
            "metrics = \"localhost:9464\"",
            String::new(),
            "host.metrics",
            Problem::BadListenAddress("localhost:9464".into()),
        ),
        (
            "relative run_dir",
            "run_dir = \"run/vsocket\"",
            String::new(),
            "host.run_dir",
            Problem::RelativePath("run/vsocket".into()),
        ),
    ];

    for (what, host_extra, rest, field, problem) in cases {
        let err = parse_text(&config_text(host_extra, &rest)).expect_err(what);
        let expected_message = format!("{ORIGIN}: {field}: {problem}");
        assert_eq!(err.to_string(), expected_message, "{what}");
        match err {
            ConfigError::Invalid { file, field: got_field, problem: got_problem } => {
                assert_eq!(file, PathBuf::from(ORIGIN), "{what}");
                assert_eq!(got_field, field, "{what}");
                assert_eq!(got_problem, problem, "{what}");
            }
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }
}

#[test]
fn messages_read_as_documented() {
    let err = parse_text(&config_text("", &guest_b("vpc = \"red\"\naddresses = [\"10.10.0.3\"]"))).unwrap_err();
    assert_eq!(err.to_string(), "/etc/vsocket/lab.toml: guest[1].vpc: unknown VPC \"red\"");

    let err = parse_text(&config_text(
        "",
        &group_with_rule("protocol = \"tcp\"\nports = \"2000-1000\"\ncidr = \"0.0.0.0/0\""),
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/vsocket/lab.toml: security_group \"extra\".ingress[0].ports: \
         port range 2000-1000 ends before it starts"
    );

    let err = parse_text(&config_text("", &guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.2\"]"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/vsocket/lab.toml: guest[1].addresses[0]: \
         10.10.0.2 in VPC \"blue\" duplicates guest[0].addresses[0]"
    );
}

#[test]
fn toml_errors_name_the_file_and_the_line() {
    // (what, text, text on the line toml should point at, fragment of its message)
    let cases = [
        ("syntax", "[host\nname = \"h\"\n".to_owned(), "[host", "invalid table header"),
        (
            "missing [host]",
            "[[vpc]]\nname = \"blue\"\ncidr = \"10.0.0.0/8\"\n".to_owned(),
            "[[vpc]]",
            "missing field `host`",
        ),
        (
            "unknown field in a guest",
            config_text("", &guest_b("vpc = \"blue\"\nadresses = [\"10.10.0.3\"]")),
            "adresses",
            "unknown field `adresses`",
        ),
        (
            "unknown top-level table",
            config_text("", "[[guests]]\nname = \"b\""),
            "[[guests]]",
            "unknown field `guests`",
        ),
        ("unknown deny_action", config_text("deny_action = \"bounce\"", ""), "bounce", "unknown variant `bounce`"),
        (
            "unknown protocol",
            config_text("", &group_with_rule("protocol = \"sctp\"\ncidr = \"0.0.0.0/0\"")),
            "sctp",
            "unknown variant `sctp`",
        ),
        (
            "ports of the wrong type",
            config_text("", &group_with_rule("protocol = \"tcp\"\nports = [80]\ncidr = \"0.0.0.0/0\"")),
            "[80]",
            "a port number, a range like \"1000-2000\", or \"all\"",
        ),
        ("negative ring size", config_text("ring_size = -1", ""), "-1", "ring_size"),
    ];
    for (what, text, needle, fragment) in cases {
        let line = 1 + text.lines().position(|l| l.contains(needle)).expect(needle);
        let err = parse_text(&text).expect_err(what);
        let message = err.to_string();
        assert!(matches!(err, ConfigError::Toml { .. }), "{what}: {err:?}");
        assert!(
            message.starts_with(&format!("{ORIGIN}: TOML parse error at line {line}, column ")),
            "{what}: {message}"
        );
        assert!(message.contains(fragment), "{what}: {message}");
    }
}

#[test]
fn same_address_in_two_vpcs_is_fine() {
    let config = parse_text(&config_text("", &guest_b("vpc = \"green\"\naddresses = [\"10.10.0.2\"]")))
        .expect("overlapping tenants are allowed");
    let addr = Ipv4Addr::new(10, 10, 0, 2);
    let blue = config.vpc_by_name("blue").unwrap();
    let green = config.vpc_by_name("green").unwrap();
    assert_eq!(config.guest_owning(blue, addr), config.guest_by_name("a"));
    assert_eq!(config.guest_owning(green, addr), config.guest_by_name("b"));
    assert_eq!(config.guest_owning(green, Ipv4Addr::new(10, 10, 0, 3)), None);
}

#[test]
fn defaults_fill_in_optional_fields() {
    let config = parse_text(&config_text("", &guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]"))).unwrap();
    assert_eq!(
        *config.host(),
        HostConfig {
            name: "host1".into(),
            run_dir: HostConfig::DEFAULT_RUN_DIR.into(),
            deny_action: DenyAction::Drop,
            on_policy_change: PolicyChangeAction::Keep,
            ring_size: 262_144,
            flow_log: None,
            metrics: None,
            default_quotas: Quotas::DEFAULT,
            vsock_backend: HostConfig::DEFAULT_VSOCK_BACKEND.into(),
            store: None,
        }
    );
    // Ten thousand connections per guest fit, at the default ring size.
    assert_eq!(Quotas::DEFAULT.max_connections, 16384);
    assert_eq!(Quotas::DEFAULT.max_shared_memory, 9 << 30);
    assert!(Quotas::DEFAULT.max_shared_memory >= 16384 * 2 * (4096 + HostConfig::DEFAULT_RING_SIZE as u64));
    assert_eq!(Quotas::DEFAULT.max_channels, 1024);
    let b = config.guest(config.guest_by_name("b").unwrap());
    assert_eq!(b.netns, "vs-b");
    assert!(b.groups.is_empty());
    assert_eq!(b.quotas, Quotas::DEFAULT);

    let extra = group_with_rule("protocol = \"udp\"\ncidr = \"10.0.0.7\"");
    let config = parse_text(&config_text("", &extra)).unwrap();
    let group = config.security_group(config.security_group_by_name("extra").unwrap());
    assert_eq!(group.ingress[0].ports, PortRange::ALL);
    assert_eq!(group.ingress[0].peer, Peer::Cidr("10.0.0.7/32".parse().unwrap()), "a bare address is a /32");
    assert!(group.egress.is_empty());
}

#[test]
fn explicit_host_settings_are_kept() {
    let config =
        parse_text(&config_text("run_dir = \"/tmp/vs\"\ndeny_action = \"reject\"\nring_size = 4096", "")).unwrap();
    assert_eq!(config.host().run_dir, Path::new("/tmp/vs"));
    assert_eq!(config.host().deny_action, DenyAction::Reject);
    assert_eq!(config.host().ring_size, HostConfig::MIN_RING_SIZE);

    let config = parse_text(&config_text("ring_size = 67108864", "")).unwrap();
    assert_eq!(config.host().ring_size, HostConfig::MAX_RING_SIZE);
}

#[test]
fn flow_log_and_metrics_settings() {
    let config = parse_text(&config_text("flow_log = \"/var/log/vsocket/flow.log\"", "")).unwrap();
    assert_eq!(
        config.host().flow_log,
        Some(FlowLogConfig {
            path: "/var/log/vsocket/flow.log".into(),
            max_bytes: FlowLogConfig::DEFAULT_MAX_BYTES,
            keep: FlowLogConfig::DEFAULT_KEEP,
        })
    );
    assert_eq!(config.host().metrics, None);

    let config = parse_text(&config_text(
        "flow_log = \"/tmp/f.log\"\nflow_log_max_bytes = 4096\nflow_log_keep = 1000\nmetrics = \"[::1]:9464\"",
        "",
    ))
    .unwrap();
    let flow_log = config.host().flow_log.clone().unwrap();
    assert_eq!((flow_log.max_bytes, flow_log.keep), (FlowLogConfig::MIN_MAX_BYTES, FlowLogConfig::MAX_KEEP));
    assert_eq!(config.host().metrics, Some("[::1]:9464".parse().unwrap()));

    let err = parse_text(&config_text("flow_log = \"/tmp/f.log\"\nflow_log_keep = 0", "")).unwrap_err();
    assert_eq!(err.to_string(), "/etc/vsocket/lab.toml: host.flow_log_keep: 0 is not within 1-1000");
    let err = parse_text(&config_text("metrics = \"9464\"", "")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/vsocket/lab.toml: host.metrics: \"9464\" is not an IP address and port like \"127.0.0.1:9464\""
    );
}

#[test]
fn ports_accept_numbers_ranges_and_all() {
    let cases = [
        ("6379", PortRange::new(6379, 6379)),
        ("6379", PortRange::new(6379, 6379)),
        ("\"6379\"", PortRange::new(6379, 6379)),
        ("\"1-65535\"", PortRange::new(1, 65535)),
        ("\"1000-1000\"", PortRange::new(1000, 1000)),
        ("\"all\"", Some(PortRange::ALL)),
    ];
    for (ports, expected) in cases {
        let extra = group_with_rule(&format!("protocol = \"tcp\"\nports = {ports}\ngroup = \"web\""));
        let config = parse_text(&config_text("", &extra)).expect(ports);
        let group = config.security_group(config.security_group_by_name("extra").unwrap());
        assert_eq!(Some(group.ingress[0].ports), expected, "{ports}");
    }
}

#[test]
fn rules_may_name_groups_defined_later_and_themselves() {
    let text = config_text(
        "",
        r#"
[[security_group]]
name = "early"
[[security_group.egress]]
protocol = "all"
group = "late"
[[security_group.ingress]]
protocol = "all"
group = "early"

[[security_group]]
name = "late"
"#,
    );
    let config = parse_text(&text).unwrap();
    let early_id = config.security_group_by_name("early").unwrap();
    let late_id = config.security_group_by_name("late").unwrap();
    let early = config.security_group(early_id);
    assert_eq!(early.egress[0].peer, Peer::Group(late_id));
    assert_eq!(early.ingress[0].peer, Peer::Group(early_id));
}

#[test]
fn load_reports_unreadable_files_with_their_cause() {
    let path = Path::new("/nonexistent/vsocket/lab.toml");
    let err = load(path).unwrap_err();
    assert_eq!(err.to_string(), "cannot read /nonexistent/vsocket/lab.toml");
    let source = err.source().expect("the I/O error is the source");
    assert!(source.to_string().contains("No such file"), "{source}");
}

/// The example in the `config` module docs must stay a valid file.
#[test]
fn module_doc_example_parses() {
    let source = include_str!("../src/config.rs");
    let example: String = source
        .lines()
        .skip_while(|line| *line != "//! ```toml")
        .skip(1)
        .take_while(|line| *line != "//! ```")
        .map(|line| format!("{}\n", line.trim_start_matches("//!").trim_start_matches(' ')))
        .collect();
    assert!(example.contains("[[guest]]"), "example not found");
    let config = parse(&example, Path::new("config.rs")).expect("doc example parses");
    assert_eq!(config.guests().len(), 2);
    assert_eq!(config.security_groups().len(), 2);
    let redis = config.security_group(config.security_group_by_name("redis").unwrap());
    assert_eq!(redis.ingress.len(), 2);
    assert_eq!(redis.ingress[0].protocol, ProtocolFilter::Only(Protocol::Tcp));
}

#[test]
fn quotas_fall_back_from_guest_to_host_to_built_in() {
    let text = config_text(
        "ring_size = 4096\ndefault_max_connections = 10\ndefault_max_shared_memory = \"1MiB\"",
        &guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nmax_connections = 3\nmax_shared_memory = 16384\nmax_channels = 2"),
    );
    let config = parse_text(&text).unwrap();
    assert_eq!(
        config.host().default_quotas,
        Quotas { max_connections: 10, max_shared_memory: 1 << 20, max_channels: Quotas::DEFAULT.max_channels }
    );
    let a = config.guest(config.guest_by_name("a").unwrap());
    assert_eq!(a.quotas, config.host().default_quotas, "a sets nothing: the host's defaults");
    let b = config.guest(config.guest_by_name("b").unwrap());
    assert_eq!(b.quotas, Quotas { max_connections: 3, max_shared_memory: 16384, max_channels: 2 });
    assert_eq!(config.host().segment_size(), 16384);
}

#[test]
fn sizes_take_binary_units() {
    let size = |text: &str| -> Result<u64, ConfigError> {
        let config = parse_text(&config_text(&format!("default_max_shared_memory = {text}"), ""))?;
        Ok(config.host().default_quotas.max_shared_memory)
    };
    for (text, bytes) in [
        ("1048576", 1 << 20),
        ("\"1048576\"", 1 << 20),
        ("\"1048576B\"", 1 << 20),
        ("\"1024KiB\"", 1 << 20),
        ("\"64MiB\"", 64 << 20),
        ("\"64 MiB\"", 64 << 20),
        ("\"2GiB\"", 2 << 30),
        ("\"1TiB\"", 1 << 40),
    ] {
        assert_eq!(size(text).unwrap(), bytes, "{text}");
    }
    for text in ["\"64MB\"", "\"64mib\"", "\"MiB\"", "\"1.5GiB\"", "\"-1\"", "\"99999999999TiB\"", "\"\""] {
        let err = size(text).unwrap_err();
        let text = text.trim_matches('"');
        assert_eq!(
            err.to_string(),
            format!(
                "/etc/vsocket/lab.toml: host.default_max_shared_memory: \"{text}\" is not a size: \
                 a number of bytes, or a number with KiB, MiB, GiB or TiB like \"64MiB\""
            )
        );
    }
    let err = size("-5").unwrap_err();
    assert!(
        err.to_string().ends_with(
            "host.default_max_shared_memory: \"-5\" is not a size: \
         a number of bytes, or a number with KiB, MiB, GiB or TiB like \"64MiB\""
        ),
        "{err}"
    );
}

#[test]
fn bad_quotas_name_file_field_and_problem() {
    let guest = |line: &str| guest_b(&format!("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\n{line}"));
    let cases: Vec<(String, String, &str, Problem)> = vec![
        (
            "default_max_connections = 0".into(),
            String::new(),
            "host.default_max_connections",
            Problem::QuotaBelowOne(0),
        ),
        ("default_max_channels = -3".into(), String::new(), "host.default_max_channels", Problem::QuotaBelowOne(-3)),
        (
            "default_max_shared_memory = 4096".into(),
            String::new(),
            "host.default_max_shared_memory",
            Problem::SharedMemoryBelowSegment { size: 4096, segment: 532_480, ring_size: 262_144 },
        ),
        (String::new(), guest("max_connections = 0"), "guest[1].max_connections", Problem::QuotaBelowOne(0)),
        (String::new(), guest("max_channels = 0"), "guest[1].max_channels", Problem::QuotaBelowOne(0)),
        (
            "ring_size = 65536".into(),
            guest("max_shared_memory = \"128KiB\""),
            "guest[1].max_shared_memory",
            Problem::SharedMemoryBelowSegment { size: 131_072, segment: 139_264, ring_size: 65_536 },
        ),
        (
            String::new(),
            guest("max_shared_memory = \"1 GB\""),
            "guest[1].max_shared_memory",
            Problem::BadSize("1 GB".into()),
        ),
    ];
    for (host, rest, field, problem) in cases {
        match parse_text(&config_text(&host, &rest)) {
            Err(ConfigError::Invalid { file, field: got_field, problem: got_problem }) => {
                assert_eq!(file, PathBuf::from(ORIGIN));
                assert_eq!((got_field.as_str(), &got_problem), (field, &problem));
            }
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    let err = parse_text(&config_text("ring_size = 65536", &guest("max_shared_memory = 4096"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/vsocket/lab.toml: guest[1].max_shared_memory: 4096 bytes do not hold one connection's segment \
         (139264 bytes with host.ring_size = 65536)"
    );
    let err = parse_text(&config_text("", &guest("max_connections = 0"))).unwrap_err();
    assert_eq!(err.to_string(), "/etc/vsocket/lab.toml: guest[1].max_connections: 0 is below the minimum of 1");
    // A wrong type is toml's to report, with the line.
    let err = parse_text(&config_text("", &guest("max_connections = \"ten\""))).unwrap_err();
    assert!(matches!(err, ConfigError::Toml { .. }), "{err}");
}

/// A `[fabric]` of this host and "host2", of `kind`.
fn fabric_table(kind: &str) -> String {
    format!(
        "[fabric]\nkind = \"{kind}\"\n[[fabric.host]]\nname = \"host1\"\naddress = \"10.99.0.1:7470\"\n\
         [[fabric.host]]\nname = \"host2\"\naddress = \"10.99.0.2:7470\"\n"
    )
}

#[test]
fn guests_are_placed_on_this_host_or_a_fabric_host() {
    let remote = guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nhost = \"host2\"");
    let config = parse_text(&config_text("", &format!("{}\n{remote}", fabric_table("ucx")))).unwrap();
    let fabric = config.fabric().unwrap();
    assert_eq!(fabric.kind, vsocket_policy::FabricKind::Ucx);
    assert_eq!(fabric.host("host2").unwrap().address, "10.99.0.2:7470".parse().unwrap());
    let a = config.guest_by_name("a").unwrap();
    let b = config.guest_by_name("b").unwrap();
    assert_eq!((config.guest(a).host.as_str(), config.is_local(a)), ("host1", true));
    assert_eq!((config.guest(b).host.as_str(), config.is_local(b)), ("host2", false));
    // Without a fabric, every guest is local; kind defaults to tcp.
    let config = parse_text(&config_text("", "")).unwrap();
    assert!(config.fabric().is_none());
    let text = fabric_table("tcp").replace("kind = \"tcp\"\n", "");
    let fabric = parse_text(&config_text("", &text)).unwrap().fabric().unwrap().clone();
    assert_eq!(fabric.kind, vsocket_policy::FabricKind::Tcp);
    // Cross-host rings default to 1 MiB per direction, apart from host.ring_size.
    assert_eq!(fabric.ring_size, 1 << 20);
    assert_eq!(fabric.segment_size(), 2 * (4096 + (1 << 20)));
    let text = fabric_table("tcp").replace("[fabric]\n", "[fabric]\nring_size = 4194304\n");
    assert_eq!(parse_text(&config_text("", &text)).unwrap().fabric().unwrap().ring_size, 4 << 20);
}

#[test]
fn bad_placement_and_fabric_name_file_field_and_problem() {
    let placed = |host: &str| guest_b(&format!("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nhost = \"{host}\""));
    let cases: Vec<(String, &str, Problem)> = vec![
        (placed("host2"), "guest[1].host", Problem::UnknownHost("host2".into())),
        (format!("{}{}", fabric_table("tcp"), placed("host3")), "guest[1].host", Problem::UnknownHost("host3".into())),
        (
            fabric_table("tcp").replace("name = \"host1\"", "name = \"hostx\""),
            "fabric.host",
            Problem::FabricWithoutThisHost("host1".into()),
        ),
        (
            fabric_table("tcp").replace("10.99.0.2:7470", "10.99.0.2"),
            "fabric.host[1].address",
            Problem::BadListenAddress("10.99.0.2".into()),
        ),
        (
            fabric_table("tcp").replace("[fabric]\n", "[fabric]\nring_size = 1000000\n"),
            "fabric.ring_size",
            Problem::BadRingSize(1_000_000),
        ),
        (
            fabric_table("tcp").replace("name = \"host2\"", "name = \"host1\""),
            "fabric.host[1].name",
            Problem::Duplicate { value: "host1".into(), first: "fabric.host[0].name".into() },
        ),
        (
            format!(
                "{}{}",
                fabric_table("tcp"),
                guest_b("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nmax_shared_memory = 1048576")
            ),
            "guest[1].max_shared_memory",
            Problem::SharedMemoryBelowFabricSegment {
                size: 1 << 20,
                segment: 2 * (4096 + (1 << 20)),
                ring_size: 1 << 20,
            },
        ),
    ];
    for (rest, field, problem) in cases {
        match parse_text(&config_text("", &rest)) {
            Err(ConfigError::Invalid { field: got_field, problem: got_problem, .. }) => {
                assert_eq!((got_field.as_str(), &got_problem), (field, &problem));
            }
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    // A host default too small for a relayed segment is named as such; a
    // smaller fabric ring makes it fit.
    let small_default = "default_max_shared_memory = \"2MiB\"";
    let err = parse_text(&config_text(small_default, &fabric_table("tcp"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/vsocket/lab.toml: host.default_max_shared_memory: 2097152 bytes do not hold one cross-host \
         connection's segment (2105344 bytes with fabric.ring_size = 1048576): raise it or lower fabric.ring_size"
    );
    let smaller_ring = fabric_table("tcp").replace("[fabric]\n", "[fabric]\nring_size = 262144\n");
    assert!(parse_text(&config_text(small_default, &smaller_ring)).is_ok());
    let err = parse_text(&config_text("", &placed("elsewhere"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/vsocket/lab.toml: guest[1].host: unknown host \"elsewhere\" (not host.name or a fabric.host)"
    );
    let err = parse_text(&config_text("", &fabric_table("rdma"))).unwrap_err();
    assert!(err.to_string().contains("unknown variant `rdma`"), "{err}");
}

#[test]
fn a_fabric_key_file_is_absolute_private_and_long_enough() {
    let keyed = |path: &str| fabric_table("tcp").replace("[fabric]\n", &format!("[fabric]\nkey_file = \"{path}\"\n"));
    match parse_text(&config_text("", &keyed("fabric.key"))) {
        Err(ConfigError::Invalid { field, problem, .. }) => {
            assert_eq!((field.as_str(), problem), ("fabric.key_file", Problem::RelativePath("fabric.key".into())));
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let dir = std::env::temp_dir().join(format!("vsocket-policy-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fabric.key");
    let load = |contents: &str, mode: u32| {
        std::fs::write(&file, contents).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        let config = parse_text(&config_text("", &keyed(file.to_str().unwrap()))).unwrap();
        config.fabric().unwrap().load_key()
    };
    let key = load("0123456789abcdef-secret\n", 0o600).unwrap().unwrap();
    assert_eq!(key.bytes(), b"0123456789abcdef-secret", "the trailing newline is not part of the key");
    assert_eq!(format!("{key:?}"), "FabricKey(..)", "the key never shows in logs");
    let err = load("0123456789abcdef-secret\n", 0o644).unwrap_err().to_string();
    assert!(err.contains("may be read or written by others (mode 644)"), "{err}");
    let err = load("short\n", 0o600).unwrap_err().to_string();
    assert!(err.contains("holds 5 bytes of key; at least 16 are needed"), "{err}");
    std::fs::remove_file(&file).unwrap();
    let config = parse_text(&config_text("", &keyed(file.to_str().unwrap()))).unwrap();
    let err = config.fabric().unwrap().load_key().unwrap_err().to_string();
    assert!(err.starts_with(&format!("cannot read {}: ", file.display())), "{err}");
    let config = parse_text(&config_text("", &keyed(dir.to_str().unwrap()))).unwrap();
    let err = config.fabric().unwrap().load_key().unwrap_err().to_string();
    assert_eq!(err, format!("{} is not a regular file", dir.display()));
    // Without key_file, links are not authenticated.
    assert!(matches!(
        parse_text(&config_text("", &fabric_table("tcp"))).unwrap().fabric().unwrap().load_key(),
        Ok(None)
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_relay_polls_for_a_bounded_while() {
    let with = |line: &str| fabric_table("tcp").replace("[fabric]\n", &format!("[fabric]\n{line}\n"));
    let poll = |text: &str| parse_text(&config_text("", text)).map(|c| c.fabric().unwrap().busy_poll_us);
    assert_eq!(poll(&fabric_table("tcp")).unwrap(), vsocket_policy::FabricConfig::DEFAULT_BUSY_POLL_US);
    assert_eq!(poll(&with("busy_poll_us = 0")).unwrap(), 0);
    assert_eq!(poll(&with("busy_poll_us = 10000")).unwrap(), 10_000);
    for bad in [-1, 10_001] {
        let err = poll(&with(&format!("busy_poll_us = {bad}"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("/etc/vsocket/lab.toml: fabric.busy_poll_us: {bad} is not within 0-10000 (microseconds)")
        );
    }
}

/// Guest "b" as a VM with `vm` as its `[guest.vm]` table.
fn vm_guest_b(vm: &str) -> String {
    guest_b(&format!("vpc = \"blue\"\naddresses = [\"10.10.0.3\"]\nmax_shared_memory = \"32MiB\"\n[guest.vm]\n{vm}"))
}

#[test]
fn a_guest_may_be_a_vm_with_its_cid_region_and_memory() {
    let config = parse_text(&config_text("", &vm_guest_b("cid = 7\nregion = \"16MiB\"\nmemory = \"1GiB\""))).unwrap();
    let a = config.guest(config.guest_by_name("a").unwrap());
    assert_eq!(a.vm, None);
    let b = config.guest(config.guest_by_name("b").unwrap());
    assert_eq!(b.vm, Some(vsocket_policy::VmGuest { cid: 7, region: 16 << 20, memory: 1 << 30 }));
    // RAM has a default.
    let config = parse_text(&config_text("", &vm_guest_b("cid = 3\nregion = 1048576"))).unwrap();
    let b = config.guest(config.guest_by_name("b").unwrap());
    assert_eq!(b.vm.map(|vm| vm.memory), Some(vsocket_policy::VmGuest::DEFAULT_MEMORY));
}

#[test]
fn a_vm_guest_s_errors_name_the_field() {
    let segment = parse_text(&config_text("", "")).unwrap().host().segment_size();
    let bad_region = |size: u64| Problem::BadRegion { size, segment, quota: 32 << 20 };
    let cases: Vec<(String, &str, Problem)> = vec![
        (vm_guest_b("cid = 2\nregion = \"16MiB\""), "guest[1].vm.cid", Problem::BadCid(2)),
        (vm_guest_b("cid = -1\nregion = \"16MiB\""), "guest[1].vm.cid", Problem::BadCid(-1)),
        (vm_guest_b("cid = 4294967295\nregion = \"16MiB\""), "guest[1].vm.cid", Problem::BadCid(4294967295)),
        (vm_guest_b("cid = 3\nregion = \"64MiB\""), "guest[1].vm.region", bad_region(64 << 20)),
        (vm_guest_b("cid = 3\nregion = 4096"), "guest[1].vm.region", bad_region(4096)),
        (vm_guest_b("cid = 3\nregion = 2000001"), "guest[1].vm.region", bad_region(2000001)),
        (vm_guest_b("cid = 3\nregion = \"lots\""), "guest[1].vm.region", Problem::BadSize("lots".into())),
        (vm_guest_b("cid = 3\nregion = \"16MiB\"\nmemory = \"64MiB\""), "guest[1].vm.memory", Problem::BadVmMemory(64 << 20)),
        (
            vm_guest_b("cid = 3\nregion = \"16MiB\"\nmemory = 200000000"),
            "guest[1].vm.memory",
            Problem::BadVmMemory(200000000),
        ),
        (
            format!(
                "{}[[guest]]\nname = \"c\"\nvpc = \"blue\"\naddresses = [\"10.10.0.4\"]\n[guest.vm]\ncid = 3\nregion = \"1MiB\"\n",
                vm_guest_b("cid = 3\nregion = \"16MiB\"")
            ),
            "guest[2].vm.cid",
            Problem::Duplicate { value: "3".into(), first: "guest[1].vm.cid".into() },
        ),
    ];
    for (rest, field, problem) in cases {
        match parse_text(&config_text("", &rest)) {
            Err(ConfigError::Invalid { file, field: f, problem: p }) => {
                assert_eq!((file.as_path(), f.as_str(), &p), (Path::new(ORIGIN), field, &problem), "{rest}");
                assert!(!p.to_string().is_empty());
            }
            other => panic!("{rest}: expected {field}: {problem:?}, got {other:?}"),
        }
    }
    // An unknown key in [guest.vm] is an error that names it.
    let err = parse_text(&config_text("", &vm_guest_b("cid = 3\nregion = \"16MiB\"\nram = 1"))).unwrap_err();
    assert!(err.to_string().contains("ram"), "{err}");
}

#[test]
fn a_store_is_etcd_endpoints_and_a_prefix() {
    let with = |store: &str| parse_text(&config_text(store, ""));
    let config = with("[host.store]\netcd = [\"http://127.0.0.1:2379\", \"http://10.0.0.2:2379/\"]\n").unwrap();
    let store = config.host().store.clone().unwrap();
    assert_eq!(store.endpoints, ["http://127.0.0.1:2379", "http://10.0.0.2:2379/"]);
    assert_eq!(store.prefix, "/vsocket/");
    let config = with("[host.store]\netcd = [\"http://a:1\"]\nprefix = \"/fleet-1\"\n").unwrap();
    assert_eq!(config.host().store.as_ref().unwrap().prefix, "/fleet-1/");
    for (store, message) in [
        ("etcd = []", "host.store.etcd: must not be empty"),
        ("etcd = [\"127.0.0.1:2379\"]", "host.store.etcd[0]: \"127.0.0.1:2379\" is not http://HOST:PORT"),
        ("etcd = [\"http://a:1\"]\nprefix = \"v\"", "host.store.prefix: \"v\" does not start with '/'"),
    ] {
        let e = with(&format!("[host.store]\n{store}\n")).unwrap_err().to_string();
        assert!(e.ends_with(message), "{e}");
    }
}
