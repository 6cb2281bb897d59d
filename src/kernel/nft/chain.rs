//! Chains: base chains with their hook, priority, type and policy.

use super::*;

pub(super) const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
const HOOK_HOOKNUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;

fn hook_number(hook: Hook) -> u32 {
    match hook {
        Hook::Prerouting => NF_INET_PRE_ROUTING,
        Hook::Input => NF_INET_LOCAL_IN,
        Hook::Forward => NF_INET_FORWARD,
        Hook::Output => NF_INET_LOCAL_OUT,
    }
}

impl Batch {
    pub(super) fn new_chain(&mut self, chain: &Chain) {
        self.label(format!("chain {}", chain.name));
        self.msg(MSG_NEWCHAIN, NLM_F_CREATE);
        self.b.attr_str(CHAIN_TABLE, TABLE);
        self.b.attr_str(CHAIN_NAME, &chain.name);
        if let Some(base) = &chain.base {
            let hook = self.b.nest(CHAIN_HOOK);
            self.b.attr_u32(HOOK_HOOKNUM, hook_number(base.hook));
            self.b.attr_u32(HOOK_PRIORITY, base.priority as u32);
            self.b.nest_end(hook);
            self.b
                .attr_u32(CHAIN_POLICY, if base.accept { NF_ACCEPT } else { NF_DROP });
            self.b
                .attr_str(CHAIN_TYPE, if base.nat { "nat" } else { "filter" });
        }
        self.b.end();
    }
}

pub(super) fn decode_chain(payload: &[u8]) -> Chain {
    let mut chain = Chain {
        name: String::new(),
        base: None,
        rules: Vec::new(),
    };
    let (mut hook, mut priority, mut policy) = (None, 0i32, NF_ACCEPT);
    let mut nat = false;
    for (k, v) in attrs(payload) {
        match k {
            CHAIN_NAME => chain.name = c_str(v),
            CHAIN_TYPE => nat = c_str(v) == "nat",
            CHAIN_HOOK => {
                for (hk, hv) in attrs(v) {
                    match hk {
                        HOOK_HOOKNUM => hook = be_u32(hv),
                        HOOK_PRIORITY => priority = be_u32(hv).unwrap_or(0) as i32,
                        _ => {}
                    }
                }
            }
            CHAIN_POLICY => policy = be_u32(v).unwrap_or(NF_ACCEPT),
            _ => {}
        }
    }
    // A hook egret never writes decodes as none: the table then differs
    // from what egret loaded, which is what tamper detection must see.
    let hook = hook.and_then(|h| {
        [Hook::Prerouting, Hook::Input, Hook::Forward, Hook::Output]
            .into_iter()
            .find(|&k| hook_number(k) == h)
    });
    if let Some(hook) = hook {
        chain.base = Some(BaseChain {
            hook,
            nat,
            priority,
            accept: policy == NF_ACCEPT,
        });
    }
    chain
}

impl Nftables {
    /// The live table's chains, without their rules.
    pub(super) fn live_chains(&mut self) -> Result<Vec<Chain>> {
        let mut chains = Vec::new();
        let req = self.request(MSG_GETCHAIN, |b| b.attr_str(CHAIN_TABLE, TABLE));
        self.sock.dump(&req, |_, p| {
            chains.push(decode_chain(p.get(4..).unwrap_or_default()))
        })??;
        Ok(chains)
    }
}
