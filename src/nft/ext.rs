//! What `nftnl` 0.9 lacks, written once: a generic expression builder (payload load/write,
//! inverted lookups by set name, meta set of any key, redir, tproxy, socket, native queue,
//! the xtables compat `target`) and named sets with typed keys, flags and per-element
//! flags (interval sets). Every `unsafe` block sits in a small wrapper here.
//!
//! Everything returned implements nftnl's `Expression` / `NlMsg`, so `netlink` builds rules
//! and batches with nftnl's own `Rule` and `Batch`.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;

use nftnl::expr::Expression;
use nftnl::{MsgType, NlMsg, Rule};
use nftnl_sys as sys;

// Kernel constants that libc / the installed uapi headers may not carry.
pub const NFT_REG_VERDICT: u32 = 0;
pub const NFT_REG_1: u32 = 1;
pub const NFT_REG_2: u32 = 2;
pub const NFT_PAYLOAD_LL_HEADER: u32 = 0;
pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub const NFT_META_PROTOCOL: u32 = 1;
pub const NFT_META_MARK: u32 = 3;
pub const NFT_META_IIFNAME: u32 = 6;
pub const NFT_META_NFPROTO: u32 = 15;
pub const NFT_META_L4PROTO: u32 = 16;
pub const NFT_META_PKTTYPE: u32 = 19;
/// `meta broute` (kernel >= 5.19 with CONFIG_NFT_BRIDGE_META); missing from older uapi headers.
pub const NFT_META_BRI_BROUTE: u32 = 35;
pub const NFT_LOOKUP_F_INV: u32 = 1;
pub const NFT_SOCKET_TRANSPARENT: u32 = 0;
pub const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
pub const NFT_QUEUE_FLAG_BYPASS: u16 = 1;
pub const NFT_QUEUE_FLAG_CPU_FANOUT: u16 = 2;
pub const NFQ_FLAG_BYPASS: u16 = 1;
pub const NFT_SET_INTERVAL: u32 = 0x4;
pub const NFT_SET_MAP: u32 = 0x8;
pub const NFT_SET_TIMEOUT: u32 = 0x10;
/// `flags dynamic`: the packet path may add elements
pub const NFT_SET_EVAL: u32 = 0x20;
pub const NFT_DYNSET_OP_UPDATE: u32 = 1;
/// First 4-byte register (`NFT_REG32_00`); `NFT_REG_1` is the same storage.
pub const NFT_REG32_00: u32 = 8;
pub const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
/// `ct` keys: `state` (a bit set, see [`CT_STATE_NEW`]) and `mark`
pub const NFT_CT_STATE: u32 = 0;
pub const NFT_CT_MARK: u32 = 3;
/// `ct state new`: NF_CT_STATE_BIT(IP_CT_NEW) = 1 << (2 + 1)
pub const CT_STATE_NEW: u32 = 1 << 3;
pub const NFPROTO_IPV4: u32 = 2;
pub const NFPROTO_IPV6: u32 = 10;

/// One attribute of a raw expression.
#[derive(Debug, Clone)]
enum Val {
    U16(u16),
    U32(u32),
    Bytes(Vec<u8>),
    /// Data libnftnl keeps (and later frees) instead of copying: the compat target's info.
    Given(Vec<u8>),
    Str(CString),
}

/// A libnftnl expression described by name and attributes. Built by the constructors below,
/// added to a rule with `Rule::add_expr`.
#[derive(Debug, Clone)]
pub struct RawExpr {
    name: &'static CStr,
    attrs: Vec<(u32, Val)>,
}

impl RawExpr {
    fn new(name: &'static CStr) -> Self {
        RawExpr {
            name,
            attrs: Vec::new(),
        }
    }
    fn u16(mut self, attr: u32, v: u16) -> Self {
        self.attrs.push((attr, Val::U16(v)));
        self
    }
    fn u32(mut self, attr: u32, v: u32) -> Self {
        self.attrs.push((attr, Val::U32(v)));
        self
    }
    fn bytes(mut self, attr: u32, v: &[u8]) -> Self {
        self.attrs.push((attr, Val::Bytes(v.to_vec())));
        self
    }
    fn given(mut self, attr: u32, v: &[u8]) -> Self {
        self.attrs.push((attr, Val::Given(v.to_vec())));
        self
    }
    fn str(mut self, attr: u32, v: &str) -> Self {
        // Names come from our own model (set names, target names): no interior NULs. A name
        // with one is replaced by an empty string, which the kernel then refuses by name.
        let c = CString::new(v).unwrap_or_default();
        self.attrs.push((attr, Val::Str(c)));
        self
    }

    /// The libnftnl expression type name (`payload`, `tproxy`, ...).
    pub fn name(&self) -> &'static CStr {
        self.name
    }
}

/// Whether the linked libnftnl knows the expression type `name` (it returns NULL otherwise).
pub fn libnftnl_has(name: &CStr) -> bool {
    // SAFETY: `name` is a valid NUL-terminated string; a non-NULL result is ours to free.
    unsafe {
        let e = sys::nftnl_expr_alloc(name.as_ptr());
        if e.is_null() {
            false
        } else {
            sys::nftnl_expr_free(e);
            true
        }
    }
}

impl Expression for RawExpr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: `name` is NUL-terminated and 'static.
        let expr = unsafe { sys::nftnl_expr_alloc(self.name.as_ptr()) };
        // `netlink::apply` checks `libnftnl_has` for every name before building, so NULL here
        // means out of memory: do what nftnl (and libstd) do.
        let Some(expr) = NonNull::new(expr) else {
            std::process::abort();
        };
        for (attr, val) in &self.attrs {
            let attr = *attr as u16;
            // SAFETY: `expr` is a live expression; libnftnl copies the data it is given, and
            // every pointer/length pair below describes memory owned by `self`.
            unsafe {
                match val {
                    Val::U16(v) => sys::nftnl_expr_set_u16(expr.as_ptr(), attr, *v),
                    Val::U32(v) => sys::nftnl_expr_set_u32(expr.as_ptr(), attr, *v),
                    Val::Bytes(b) => {
                        sys::nftnl_expr_set(
                            expr.as_ptr(),
                            attr,
                            b.as_ptr() as *const c_void,
                            b.len() as u32,
                        );
                    }
                    Val::Given(b) => {
                        // libnftnl's `target` stores this pointer and free()s it with the
                        // expression, so it must come from malloc.
                        let p = libc::malloc(b.len().max(1)) as *mut u8;
                        if p.is_null() {
                            std::process::abort();
                        }
                        std::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len());
                        sys::nftnl_expr_set(
                            expr.as_ptr(),
                            attr,
                            p as *const c_void,
                            b.len() as u32,
                        );
                    }
                    Val::Str(s) => {
                        sys::nftnl_expr_set_str(expr.as_ptr(), attr, s.as_ptr());
                    }
                }
            }
        }
        expr
    }
}

// ---- loads and compares -------------------------------------------------------------------

/// `[ payload load LENb @ BASE + OFFSET => reg 1 ]`
pub fn payload_load(base: u32, offset: u32, len: u32) -> RawExpr {
    RawExpr::new(c"payload")
        .u32(sys::NFTNL_EXPR_PAYLOAD_DREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_PAYLOAD_BASE, base)
        .u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset)
        .u32(sys::NFTNL_EXPR_PAYLOAD_LEN, len)
}

/// `[ meta load KEY => reg 1 ]`
pub fn meta_load(key: u32) -> RawExpr {
    meta_load_to(key, NFT_REG_1)
}

/// `[ meta load KEY => reg R ]`
pub fn meta_load_to(key: u32, dreg: u32) -> RawExpr {
    RawExpr::new(c"meta")
        .u32(sys::NFTNL_EXPR_META_KEY, key)
        .u32(sys::NFTNL_EXPR_META_DREG, dreg)
}

/// `[ ct load KEY => reg 1 ]`
pub fn ct_load(key: u32) -> RawExpr {
    RawExpr::new(c"ct")
        .u32(sys::NFTNL_EXPR_CT_KEY, key)
        .u32(sys::NFTNL_EXPR_CT_DREG, NFT_REG_1)
}

/// `[ ct set KEY with reg 1 ]`
pub fn ct_set(key: u32) -> RawExpr {
    RawExpr::new(c"ct")
        .u32(sys::NFTNL_EXPR_CT_KEY, key)
        .u32(sys::NFTNL_EXPR_CT_SREG, NFT_REG_1)
}

/// `[ payload load LENb @ BASE + OFFSET => reg R ]`
pub fn payload_load_to(dreg: u32, base: u32, offset: u32, len: u32) -> RawExpr {
    RawExpr::new(c"payload")
        .u32(sys::NFTNL_EXPR_PAYLOAD_DREG, dreg)
        .u32(sys::NFTNL_EXPR_PAYLOAD_BASE, base)
        .u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset)
        .u32(sys::NFTNL_EXPR_PAYLOAD_LEN, len)
}

/// `[ lookup reg S set NAME dreg D ]`: a map lookup; a missing key ends the rule.
pub fn lookup_map(set: &str, sreg: u32, dreg: u32) -> RawExpr {
    RawExpr::new(c"lookup")
        .u32(sys::NFTNL_EXPR_LOOKUP_SREG, sreg)
        .u32(sys::NFTNL_EXPR_LOOKUP_DREG, dreg)
        .str(sys::NFTNL_EXPR_LOOKUP_SET, set)
        .u32(sys::NFTNL_EXPR_LOOKUP_FLAGS, 0)
}

/// `[ dynset update reg_key K set NAME sreg_data D ]`: add the key with the data, or refresh
/// the timeout of an existing element (the set's default timeout).
pub fn dynset_update(set: &str, sreg_key: u32, sreg_data: u32) -> RawExpr {
    RawExpr::new(c"dynset")
        .u32(sys::NFTNL_EXPR_DYNSET_SREG_KEY, sreg_key)
        .u32(sys::NFTNL_EXPR_DYNSET_SREG_DATA, sreg_data)
        .u32(sys::NFTNL_EXPR_DYNSET_OP, NFT_DYNSET_OP_UPDATE)
        .str(sys::NFTNL_EXPR_DYNSET_SET_NAME, set)
}

/// `[ hash reg 1 = jhash(reg 1, LEN, SEED) % mod MODULUS ]`: hash the LEN bytes loaded from
/// reg 1 on (a padded concatenation) and put the result in reg 1.
pub fn jhash_reg1(len: u32, modulus: u32, seed: u32) -> RawExpr {
    RawExpr::new(c"hash")
        .u32(sys::NFTNL_EXPR_HASH_SREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_HASH_DREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_HASH_LEN, len)
        .u32(sys::NFTNL_EXPR_HASH_MODULUS, modulus)
        .u32(sys::NFTNL_EXPR_HASH_SEED, seed)
        .u32(sys::NFTNL_EXPR_HASH_OFFSET, 0)
        .u32(sys::NFTNL_EXPR_HASH_TYPE, 0) // NFT_HASH_JENKINS
}

/// `[ cmp eq reg 1 DATA ]`
pub fn cmp_eq(data: &[u8]) -> RawExpr {
    RawExpr::new(c"cmp")
        .u32(sys::NFTNL_EXPR_CMP_SREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_CMP_OP, 0) // NFT_CMP_EQ
        .bytes(sys::NFTNL_EXPR_CMP_DATA, data)
}

/// `[ cmp neq reg 1 DATA ]`
pub fn cmp_neq(data: &[u8]) -> RawExpr {
    RawExpr::new(c"cmp")
        .u32(sys::NFTNL_EXPR_CMP_SREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_CMP_OP, 1) // NFT_CMP_NEQ
        .bytes(sys::NFTNL_EXPR_CMP_DATA, data)
}

/// `[ bitwise reg 1 = ( reg 1 & MASK ) ^ XOR ]`
pub fn bitwise(mask: &[u8], xor: &[u8]) -> RawExpr {
    RawExpr::new(c"bitwise")
        .u32(sys::NFTNL_EXPR_BITWISE_SREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_BITWISE_DREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32)
        .bytes(sys::NFTNL_EXPR_BITWISE_MASK, mask)
        .bytes(sys::NFTNL_EXPR_BITWISE_XOR, xor)
}

/// `[ lookup reg 1 set NAME ]`, with flag 0x1 when `negate` (`!= @set`). By name only: the
/// kernel finds sets created earlier in the same transaction by name.
pub fn lookup(set: &str, negate: bool) -> RawExpr {
    RawExpr::new(c"lookup")
        .u32(sys::NFTNL_EXPR_LOOKUP_SREG, NFT_REG_1)
        .str(sys::NFTNL_EXPR_LOOKUP_SET, set)
        .u32(
            sys::NFTNL_EXPR_LOOKUP_FLAGS,
            if negate { NFT_LOOKUP_F_INV } else { 0 },
        )
}

/// `[ socket load transparent => reg 1 ]`
pub fn socket_transparent() -> RawExpr {
    RawExpr::new(c"socket")
        .u32(sys::NFTNL_EXPR_SOCKET_KEY, NFT_SOCKET_TRANSPARENT)
        .u32(sys::NFTNL_EXPR_SOCKET_DREG, NFT_REG_1)
}

// ---- statements ---------------------------------------------------------------------------

/// `[ counter pkts 0 bytes 0 ]`
pub fn counter() -> RawExpr {
    RawExpr::new(c"counter")
}

/// `[ immediate reg R DATA ]`
pub fn immediate(reg: u32, data: &[u8]) -> RawExpr {
    RawExpr::new(c"immediate")
        .u32(sys::NFTNL_EXPR_IMM_DREG, reg)
        .bytes(sys::NFTNL_EXPR_IMM_DATA, data)
}

/// `[ immediate reg 0 VERDICT ]` (NF_ACCEPT = 1, NF_DROP = 0, NFT_RETURN = -5)
pub fn verdict(code: i32) -> RawExpr {
    RawExpr::new(c"immediate")
        .u32(sys::NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT)
        .u32(sys::NFTNL_EXPR_IMM_VERDICT, code as u32)
}

/// `[ immediate reg 0 jump -> CHAIN ]`
pub fn jump(chain: &str) -> RawExpr {
    RawExpr::new(c"immediate")
        .u32(sys::NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT)
        .u32(sys::NFTNL_EXPR_IMM_VERDICT, libc::NFT_JUMP as u32)
        .str(sys::NFTNL_EXPR_IMM_CHAIN, chain)
}

/// `[ meta set KEY with reg 1 ]`
pub fn meta_set(key: u32) -> RawExpr {
    RawExpr::new(c"meta")
        .u32(sys::NFTNL_EXPR_META_KEY, key)
        .u32(sys::NFTNL_EXPR_META_SREG, NFT_REG_1)
}

/// `[ payload write reg 1 => LENb @ BASE + OFFSET csum_type 0 ... ]` (no checksum fix-up:
/// link-layer fields carry none).
pub fn payload_write(base: u32, offset: u32, len: u32) -> RawExpr {
    RawExpr::new(c"payload")
        .u32(sys::NFTNL_EXPR_PAYLOAD_SREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_PAYLOAD_BASE, base)
        .u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset)
        .u32(sys::NFTNL_EXPR_PAYLOAD_LEN, len)
        .u32(sys::NFTNL_EXPR_PAYLOAD_CSUM_TYPE, 0)
        .u32(sys::NFTNL_EXPR_PAYLOAD_CSUM_OFFSET, 0)
        .u32(sys::NFTNL_EXPR_PAYLOAD_FLAGS, 0)
}

/// `[ redir proto_min reg 1 flags 0x2 ]` (port already in reg 1)
pub fn redir_port_reg1() -> RawExpr {
    RawExpr::new(c"redir")
        .u32(sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED)
}

/// `[ tproxy ip|ip6 [addr reg A] port reg P ]`
pub fn tproxy(nfproto: u32, addr_reg: Option<u32>, port_reg: u32) -> RawExpr {
    let mut e = RawExpr::new(c"tproxy").u32(sys::NFTNL_EXPR_TPROXY_FAMILY, nfproto);
    if let Some(r) = addr_reg {
        e = e.u32(sys::NFTNL_EXPR_TPROXY_REG_ADDR, r);
    }
    e.u32(sys::NFTNL_EXPR_TPROXY_REG_PORT, port_reg)
}

/// Native `queue` (needs CONFIG_NFT_QUEUE): queues `num .. num+total-1`.
pub fn queue(num: u16, total: u16, flags: u16) -> RawExpr {
    RawExpr::new(c"queue")
        .u16(sys::NFTNL_EXPR_QUEUE_NUM, num)
        .u16(sys::NFTNL_EXPR_QUEUE_TOTAL, total)
        .u16(sys::NFTNL_EXPR_QUEUE_FLAGS, flags)
}

/// The xtables `NFQUEUE` target through nft compat, revision 3 (`struct xt_NFQ_info_v3`:
/// queuenum, queues_total, flags, padded to XT_ALIGN = 8 bytes, host byte order).
pub fn xt_nfqueue_v3(num: u16, total: u16, bypass: bool) -> RawExpr {
    let mut info = [0u8; 8];
    info[0..2].copy_from_slice(&num.to_ne_bytes());
    info[2..4].copy_from_slice(&total.to_ne_bytes());
    let flags = if bypass { NFQ_FLAG_BYPASS } else { 0 };
    info[4..6].copy_from_slice(&flags.to_ne_bytes());
    RawExpr::new(c"target")
        .str(sys::NFTNL_EXPR_TG_NAME, "NFQUEUE")
        .u32(sys::NFTNL_EXPR_TG_REV, 3)
        .given(sys::NFTNL_EXPR_TG_INFO, &info)
}

// ---- named sets ----------------------------------------------------------------------------

/// One element of a named set as the kernel stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElem {
    pub key: Vec<u8>,
    /// NFT_SET_ELEM_INTERVAL_END or 0
    pub flags: u32,
    /// nft's "open interval" marker (runs to the end of the key space), as user data so that
    /// nft prints `0.0.0.0/0` / `65535` rather than a range
    pub open: bool,
    /// a map element's data (`: 02:00:00:00:00:31`)
    pub data: Option<Vec<u8>>,
}

/// A named set with its elements. The set itself is a libnftnl object (NEWSET); the elements
/// are serialised here ([`ElemsPayload`]): libnftnl allocates and fills one object per
/// element, which took most of the time of applying a policy with 10,000 VIPs.
pub struct NamedSet {
    set: NonNull<sys::nftnl_set>,
    family: u16,
    table: CString,
    name: CString,
    id: u32,
    elems: Vec<RawElem>,
}

// nft's open-interval element user data: NFTNL_UDATA_SET_ELEM_FLAGS (1), len 4,
// NFTNL_SET_ELEM_F_INTERVAL_OPEN (1).
const OPEN_UDATA: [u8; 6] = {
    let f = 1u32.to_ne_bytes();
    [1, 4, f[0], f[1], f[2], f[3]]
};

/// nft's set user data: NFTNL_UDATA_SET_KEYBYTEORDER (0), len 4, nft's byteorder enum
/// (1 = host, 2 = big endian).
fn set_udata(host_order_key: bool) -> [u8; 6] {
    let b = if host_order_key { 1u32 } else { 2u32 }.to_ne_bytes();
    [0, 4, b[0], b[1], b[2], b[3]]
}

impl NamedSet {
    /// `family` is the NFPROTO of the table; `key_type` nft's datatype number and
    /// `host_order_key` its byte order (both decide how `nft list` prints the elements:
    /// interface names are host-order strings); `id` unique within the batch.
    pub fn new(
        family: u16,
        table: &str,
        name: &str,
        id: u32,
        (key_type, key_len, host_order_key): (u32, u32, bool),
        flags: u32,
    ) -> Self {
        let table = CString::new(table).unwrap_or_default();
        let name = CString::new(name).unwrap_or_default();
        // SAFETY: allocation is checked; the setters copy the strings.
        let set = unsafe { sys::nftnl_set_alloc() };
        let Some(set) = NonNull::new(set) else {
            std::process::abort();
        };
        // SAFETY: `set` is live and owned by us; string pointers are valid for the call.
        unsafe {
            let s = set.as_ptr();
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, u32::from(family));
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, id);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, flags);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, key_type);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, key_len);
            let ud = set_udata(host_order_key);
            sys::nftnl_set_set_data(
                s,
                sys::NFTNL_SET_USERDATA as u16,
                ud.as_ptr() as *const c_void,
                ud.len() as u32,
            );
        }
        NamedSet {
            set,
            family,
            table,
            name,
            id,
            elems: Vec::new(),
        }
    }

    /// A map to `data_type` (`data_len` bytes) when `data` is given; `flags dynamic,timeout`
    /// with a default element timeout and a size limit.
    pub fn set_dynamic(&mut self, data: Option<(u32, u32)>, size: u32, timeout_ms: u64) {
        // SAFETY: `self.set` is live and owned by us.
        unsafe {
            let s = self.set.as_ptr();
            if let Some((ty, len)) = data {
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, ty);
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, len);
            }
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DESC_SIZE as u16, size);
            sys::nftnl_set_set_u64(s, sys::NFTNL_SET_TIMEOUT as u16, timeout_ms);
        }
    }

    /// Tells the kernel how many elements the set will hold (`NFTA_SET_DESC_SIZE`), so a
    /// hash set is created at its final size instead of growing (and rehashing) while a
    /// large batch fills it. The kernel also takes it as the set's element limit: only for
    /// sets that are created whole in one transaction and never grow afterwards.
    pub fn set_size(&mut self, size: u32) {
        // SAFETY: `self.set` is live and owned by us.
        unsafe {
            sys::nftnl_set_set_u32(self.set.as_ptr(), sys::NFTNL_SET_DESC_SIZE as u16, size);
        }
    }

    /// A map (not dynamic) to `data_type` of `data_len` bytes.
    pub fn set_map_data(&mut self, (data_type, data_len): (u32, u32)) {
        // SAFETY: `self.set` is live and owned by us.
        unsafe {
            let s = self.set.as_ptr();
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, data_type);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, data_len);
        }
    }

    pub fn add(&mut self, e: RawElem) {
        self.elems.push(e);
    }

    /// Adds only the elements (no NEWSET) to `batch`: NEWSETELEM (create, no error when
    /// present) or DELSETELEM. Returns how many messages were added.
    pub fn elems_to(&self, batch: &mut nftnl::Batch, delete: bool) -> usize {
        let (ty, flags) = if delete {
            (libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK)
        } else {
            (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_ACK,
            )
        };
        self.elem_msgs_to(batch, ty as u16, flags as u16)
    }

    /// Adds the set and its elements to `batch`; returns how many messages were added.
    pub fn add_to(&self, batch: &mut nftnl::Batch) -> usize {
        batch.add(&SetMsg(self), MsgType::Add);
        let flags = libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK;
        1 + self.elem_msgs_to(batch, libc::NFT_MSG_NEWSETELEM as u16, flags as u16)
    }

    /// The elements as messages of type `ty`, as many as the 64 KiB attribute limit needs.
    fn elem_msgs_to(&self, batch: &mut nftnl::Batch, ty: u16, flags: u16) -> usize {
        let payloads = elems_payloads(&self.table, &self.name, self.id, &self.elems);
        for payload in &payloads {
            let msg = ElemsPayload {
                ty,
                family: self.family,
                flags,
                payload,
            };
            batch.add(&msg, MsgType::Add);
        }
        payloads.len()
    }
}

impl Drop for NamedSet {
    fn drop(&mut self) {
        // SAFETY: we own the set.
        unsafe { sys::nftnl_set_free(self.set.as_ptr()) };
    }
}

struct SetMsg<'a>(&'a NamedSet);

// SAFETY: writes one NEWSET message, bounded by nft_nlmsg_maxsize like nftnl's own Set.
unsafe impl NlMsg for SetMsg<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: the caller (nftnl::Batch) provides a buffer of nft_nlmsg_maxsize bytes.
        unsafe {
            let hdr = sys::nftnl_nlmsg_build_hdr(
                buf as *mut c_char,
                libc::NFT_MSG_NEWSET as u16,
                self.0.family,
                (libc::NLM_F_CREATE | libc::NLM_F_ACK) as u16,
                seq,
            );
            sys::nftnl_set_nlmsg_build_payload(hdr, self.0.set.as_ptr());
        }
    }
}

// Set element attributes (linux/netfilter/nf_tables.h).
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// The most bytes one netlink attribute holds (its length is a u16): the element list of one
/// message stays within it, as libnftnl's own splitting does.
const NLA_MAX_LEN: usize = u16::MAX as usize;

/// Netlink attributes appended to a byte buffer (4-byte aligned, host-order headers).
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let aligned = (self.0.len() + 3) & !3;
        self.0.resize(aligned, 0);
    }

    /// Starts a nested attribute; [`Attrs::end`] writes its length.
    fn start(&mut self, ty: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One element as `NFTA_LIST_ELEM { KEY { VALUE }, DATA { VALUE }, FLAGS, USERDATA }`.
fn put_elem(a: &mut Attrs, e: &RawElem) {
    let el = a.start(NFTA_LIST_ELEM);
    let key = a.start(NFTA_SET_ELEM_KEY);
    a.put(NFTA_DATA_VALUE, &e.key);
    a.end(key);
    if let Some(d) = &e.data {
        let data = a.start(NFTA_SET_ELEM_DATA);
        a.put(NFTA_DATA_VALUE, d);
        a.end(data);
    }
    if e.flags != 0 {
        a.put(NFTA_SET_ELEM_FLAGS, &e.flags.to_be_bytes());
    }
    if e.open {
        a.put(NFTA_SET_ELEM_USERDATA, &OPEN_UDATA);
    }
    a.end(el);
}

/// The payloads (attributes after the nfgenmsg header) of the element messages of a set:
/// table, set name and batch id, then as many elements as fit one 64 KiB list attribute;
/// the next message goes on where the last stopped. No elements: no message.
fn elems_payloads(table: &CStr, set: &CStr, id: u32, elems: &[RawElem]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = elems;
    while !rest.is_empty() {
        let mut a = Attrs(Vec::with_capacity(NLA_MAX_LEN.min(64 + rest.len() * 48)));
        a.put(NFTA_SET_ELEM_LIST_TABLE, table.to_bytes_with_nul());
        a.put(NFTA_SET_ELEM_LIST_SET, set.to_bytes_with_nul());
        a.put(NFTA_SET_ELEM_LIST_SET_ID, &id.to_be_bytes());
        let list = a.start(NFTA_SET_ELEM_LIST_ELEMENTS);
        let mut taken = 0;
        for e in rest {
            let before = a.0.len();
            put_elem(&mut a, e);
            if a.0.len() - list > NLA_MAX_LEN && taken > 0 {
                a.0.truncate(before);
                break;
            }
            taken += 1;
        }
        a.end(list);
        out.push(a.0);
        rest = &rest[taken..];
    }
    out
}

/// A set element message: nftnl's header, then a payload from [`elems_payloads`].
struct ElemsPayload<'a> {
    ty: u16,
    family: u16,
    flags: u16,
    payload: &'a [u8],
}

// SAFETY: the payload is below 64 KiB plus a few names (see `elems_payloads`), within the
// nft_nlmsg_maxsize bytes the batch buffer has free.
unsafe impl NlMsg for ElemsPayload<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: the caller (nftnl::Batch) provides a buffer of nft_nlmsg_maxsize bytes;
        // the header nftnl builds says how long the message is so far.
        unsafe {
            let hdr = sys::nftnl_nlmsg_build_hdr(
                buf as *mut c_char,
                self.ty,
                self.family,
                self.flags,
                seq,
            );
            let at = (*hdr).nlmsg_len as usize;
            std::ptr::copy_nonoverlapping(
                self.payload.as_ptr(),
                (buf as *mut u8).add(at),
                self.payload.len(),
            );
            (*hdr).nlmsg_len += self.payload.len() as u32;
        }
    }
}

/// A message naming one object of a table by name: `delete set` or `flush table` (delete
/// every rule of the table, which keeps its sets and chains).
pub struct ByName {
    pub family: u16,
    pub table: CString,
    /// `Some(set)`: DELSET; `None`: DELRULE for the whole table
    pub set: Option<CString>,
}

// SAFETY: a header plus two short string attributes.
unsafe impl NlMsg for ByName {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: buffer as above; the libnftnl objects are allocated, filled, serialised and
        // freed here.
        unsafe {
            match &self.set {
                Some(name) => {
                    let s = sys::nftnl_set_alloc();
                    if s.is_null() {
                        std::process::abort();
                    }
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, self.table.as_ptr());
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
                    let hdr = sys::nftnl_nlmsg_build_hdr(
                        buf as *mut c_char,
                        libc::NFT_MSG_DELSET as u16,
                        self.family,
                        libc::NLM_F_ACK as u16,
                        seq,
                    );
                    sys::nftnl_set_nlmsg_build_payload(hdr, s);
                    sys::nftnl_set_free(s);
                }
                None => {
                    let r = sys::nftnl_rule_alloc();
                    if r.is_null() {
                        std::process::abort();
                    }
                    sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, self.table.as_ptr());
                    let hdr = sys::nftnl_nlmsg_build_hdr(
                        buf as *mut c_char,
                        libc::NFT_MSG_DELRULE as u16,
                        self.family,
                        libc::NLM_F_ACK as u16,
                        seq,
                    );
                    sys::nftnl_rule_nlmsg_build_payload(hdr, r);
                    sys::nftnl_rule_free(r);
                }
            }
        }
    }
}

/// Adds a DELSETELEM message without elements to `batch`: the kernel flushes every element
/// of the set (`nft flush set`).
pub fn flush_set_to(batch: &mut nftnl::Batch, family: u16, table: &str, set: &str) {
    let msg = FlushSet {
        family,
        table: CString::new(table).unwrap_or_default(),
        set: CString::new(set).unwrap_or_default(),
    };
    batch.add(&msg, MsgType::Del);
}

struct FlushSet {
    family: u16,
    table: CString,
    set: CString,
}

// SAFETY: a header plus two short string attributes.
unsafe impl NlMsg for FlushSet {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: the caller (nftnl::Batch) provides a buffer of nft_nlmsg_maxsize bytes; the
        // attributes are short NUL-terminated strings we own.
        unsafe {
            let hdr = sys::nftnl_nlmsg_build_hdr(
                buf as *mut c_char,
                libc::NFT_MSG_DELSETELEM as u16,
                self.family,
                libc::NLM_F_ACK as u16,
                seq,
            );
            // NFTA_SET_ELEM_LIST_TABLE = 1, NFTA_SET_ELEM_LIST_SET = 2; no ELEMENTS = flush
            mnl_attr_put_strz(hdr, 1, &self.table);
            mnl_attr_put_strz(hdr, 2, &self.set);
        }
    }
}

/// `mnl_attr_put_strz` without linking libmnl here: append a NUL-terminated string attribute
/// to the message `nlh` points to.
///
/// # Safety
/// `nlh` must point to a netlink message in a buffer with room for the attribute.
unsafe fn mnl_attr_put_strz(nlh: *mut libc::nlmsghdr, ty: u16, s: &CStr) {
    let bytes = s.to_bytes_with_nul();
    let nla_len = 4 + bytes.len();
    let aligned = (nla_len + 3) & !3;
    // SAFETY: the caller guarantees room; nlmsg_len is the message's current length, where
    // the next attribute starts (netlink messages and attributes are 4-byte aligned).
    unsafe {
        let len = (*nlh).nlmsg_len as usize;
        let at = (nlh as *mut u8).add(len);
        std::ptr::write_bytes(at, 0, aligned);
        std::ptr::copy_nonoverlapping((nla_len as u16).to_ne_bytes().as_ptr(), at, 2);
        std::ptr::copy_nonoverlapping(ty.to_ne_bytes().as_ptr(), at.add(2), 2);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), at.add(4), bytes.len());
        (*nlh).nlmsg_len = (len + aligned) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (type, payload) of the attributes in `buf`.
    fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 4 {
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            let ty = u16::from_ne_bytes([buf[2], buf[3]]);
            assert!(len >= 4 && len <= buf.len(), "bad attribute length {len}");
            out.push((ty, &buf[4..len]));
            buf = &buf[((len + 3) & !3).min(buf.len())..];
        }
        out
    }

    fn elem(i: u32) -> RawElem {
        RawElem {
            key: i.to_be_bytes().to_vec(),
            flags: u32::from(!i.is_multiple_of(2)),
            open: i == 7,
            data: i.is_multiple_of(3).then(|| vec![2, 0, 0, 0, 0, i as u8]),
        }
    }

    #[test]
    fn element_messages_split_at_the_attribute_limit_and_keep_every_element() {
        let elems: Vec<RawElem> = (0..10_000).map(elem).collect();
        let table = CString::new("brdivert").expect("name");
        let set = CString::new("vip_dst4").expect("name");
        let payloads = elems_payloads(&table, &set, 7, &elems);
        assert!(payloads.len() > 1, "10,000 elements need several messages");
        let mut seen = Vec::new();
        for p in &payloads {
            let a = attrs(p);
            assert_eq!(a[0], (NFTA_SET_ELEM_LIST_TABLE, &b"brdivert\0"[..]));
            assert_eq!(a[1], (NFTA_SET_ELEM_LIST_SET, &b"vip_dst4\0"[..]));
            assert_eq!(a[2], (NFTA_SET_ELEM_LIST_SET_ID, &7u32.to_be_bytes()[..]));
            assert_eq!(a[3].0, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
            assert!(a[3].1.len() + 4 <= NLA_MAX_LEN);
            for (ty, e) in attrs(a[3].1) {
                assert_eq!(ty, NFTA_LIST_ELEM | NLA_F_NESTED);
                let mut got = RawElem {
                    key: Vec::new(),
                    flags: 0,
                    open: false,
                    data: None,
                };
                for (ty, v) in attrs(e) {
                    match ty & !NLA_F_NESTED {
                        NFTA_SET_ELEM_KEY => got.key = attrs(v)[0].1.to_vec(),
                        NFTA_SET_ELEM_DATA => got.data = Some(attrs(v)[0].1.to_vec()),
                        NFTA_SET_ELEM_FLAGS => {
                            got.flags = u32::from_be_bytes(v.try_into().expect("u32"))
                        }
                        NFTA_SET_ELEM_USERDATA => got.open = v == OPEN_UDATA,
                        other => panic!("unexpected attribute {other}"),
                    }
                }
                seen.push(got);
            }
        }
        assert_eq!(seen, elems, "every element once, in order");
        assert!(elems_payloads(&table, &set, 7, &[]).is_empty());
    }
}
