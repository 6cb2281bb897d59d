//! The table: egret's one `inet egret`, its comment, and its replacement.

use super::*;

const TABLE_NAME: u16 = 1;
const TABLE_USERDATA: u16 = 6;

impl Batch {
    pub(super) fn ensure_and_delete_table(&mut self) {
        // "add" succeeds whether or not the table exists, so the delete that
        // follows never fails: no separate existence check, no race.
        self.msg(MSG_NEWTABLE, NLM_F_CREATE);
        self.b.attr_str(TABLE_NAME, TABLE);
        self.b.end();
        self.msg(MSG_DELTABLE, 0);
        self.b.attr_str(TABLE_NAME, TABLE);
        self.b.end();
    }

    pub(super) fn new_table(&mut self, comment: &str) {
        self.msg(MSG_NEWTABLE, NLM_F_CREATE);
        self.b.attr_str(TABLE_NAME, TABLE);
        self.b.attr(
            TABLE_USERDATA,
            &udata(UDATA_COMMENT, comment.as_bytes(), true),
        );
        self.b.end();
    }
}

/// The comment of a table message (empty when it has none).
pub(super) fn decode_table_comment(payload: &[u8]) -> String {
    attrs(payload)
        .find(|(k, _)| *k == TABLE_USERDATA)
        .and_then(|(_, ud)| udata_comment(ud))
        .unwrap_or_default()
}

impl Nftables {
    /// The live table's comment, or `None` when it is not loaded.
    pub(super) fn get_table(&mut self) -> Result<Option<String>> {
        let seq = self.next_seq();
        let mut b = MsgBuilder::default();
        b.begin(msg_type(MSG_GETTABLE), NLM_F_REQUEST, seq, NFPROTO_INET, 0);
        b.attr_str(TABLE_NAME, TABLE);
        b.end();
        let mut comment = None;
        match self.sock.dump(&b.buf, |_, p| {
            comment = Some(decode_table_comment(p.get(4..).unwrap_or_default()));
        })? {
            Ok(()) => Ok(comment),
            Err(e) if e.errno == libc::ENOENT => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
