//! Attacks on what egret serves container bridges (scope = "host+containers"
//! with [dns] and a wildcard [proxy]), run for real: the guard's container
//! listener and the proxy listen on the wildcard address, so a peer on
//! another interface must get nothing from them; and a local unprivileged
//! user who sends from the bridge's own address must still be named, never
//! taken for a container.

mod bridge_lab;
mod common;

use bridge_lab::*;
use common::*;

#[test]
fn the_outside_world_gets_nothing_from_egrets_container_listeners() {
    let l = dns_lab();
    let lab = &l.lab;
    let policy = PolicyFile::new(DNS_POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);
    // The container is served (so the listener is up)...
    let answer = dig(
        &lab.container,
        &[&format!("@{RUNTIME_RESOLVER}"), "+short", "allowed.test"],
    );
    assert_eq!(answer.trim(), ALLOWED);
    // ...the uplink's peer, asking the same listener on the host's uplink
    // address, over UDP and TCP, gets no answer at all.
    for transport in ["+notcp", "+tcp"] {
        let answer = dig(
            &lab.outside,
            &[
                &format!("@{HOST_UPLINK}"),
                "-p",
                "10053",
                transport,
                "allowed.test",
            ],
        );
        assert!(!answer.contains("status:"), "{transport}: {answer}");
    }
    // Nor from the proxy on the wildcard address ("000": no connection).
    let proxy = format!("http://{HOST_UPLINK}:3128");
    assert_eq!(
        curl_code(&lab.outside, &proxy, "http://site.test:8080/"),
        "000"
    );
    // The kernel dropped them, by the input rule.
    let rules = lab.host.nft_ruleset();
    let dropped = rules
        .lines()
        .find(|l| l.contains("not from a container bridge"))
        .unwrap_or_else(|| panic!("{rules}"));
    assert!(!dropped.contains("counter packets 0 "), "{dropped}");
    drop(run);
}

#[test]
fn a_local_user_sending_from_the_bridge_address_is_named_not_taken_for_a_container() {
    let l = dns_lab();
    let lab = &l.lab;
    let policy = PolicyFile::new(DNS_POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);
    // nobody, on the host, asks the container listener from the bridge's
    // own address (10.88.0.1): a refused name, which would be reported as a
    // "container" at 10.88.0.1 via docker0 if the guard trusted addresses.
    let out = lab
        .host
        .as_nobody(
            "dig",
            &[
                "+tries=1",
                "+time=3",
                "-b",
                "10.88.0.1",
                "@10.88.0.1",
                "-p",
                "10053",
                "hidden.other.test",
            ],
        )
        .output()
        .expect("dig");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: REFUSED"), "{text}");
    let e = run.wait_event(10, "nobody's refused query", |e| {
        at(e, "/dns/question/name") == "hidden.other.test"
    });
    assert_eq!(at(&e, "/user/name"), "nobody", "{e:#}");
    assert_eq!(at(&e, "/process/name"), "dig", "{e:#}");
    assert_ne!(at(&e, "/egret/attribution"), "bridge", "{e:#}");
    assert!(e.pointer("/observer/ingress").is_none(), "{e:#}");
    drop(run);
}
