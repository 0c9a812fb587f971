use super::*;

#[test]
fn guests_are_vmids_with_an_optional_kind() {
    assert_eq!(
        Guest::parse("105").unwrap(),
        Guest {
            kind: "qemu",
            vmid: 105
        }
    );
    assert_eq!(
        Guest::parse("lxc/200").unwrap(),
        Guest {
            kind: "lxc",
            vmid: 200
        }
    );
    assert!(Guest::parse("vm/105").is_err());
    assert!(Guest::parse("99").is_err());
    assert!(Guest::parse("dev").is_err());
}

#[test]
fn agent_and_container_interfaces() {
    let agent: Value = serde_json::json!({"name": "eth0", "ip-addresses": [
        {"ip-address": "192.0.2.10", "ip-address-type": "ipv4", "prefix": 24}]});
    assert_eq!(
        interface(&agent).addrs,
        vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
    );
    let ct: Value = serde_json::json!({"name": "eth0", "inet": "192.0.2.11/24"});
    assert_eq!(
        interface(&ct).addrs,
        vec!["192.0.2.11".parse::<IpAddr>().unwrap()]
    );
}
