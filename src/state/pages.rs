//! Integer pages: how [`super::SledStore`] keeps the states of integer keys.
//!
//! Most partner tables have integer primary keys, and a snapshot or a
//! bulk load writes them in order. One sled entry per record made sled's
//! B-tree insert a third of the daemon's CPU and its memory grow by about
//! 20 bytes per key. So a key whose source key is a canonical unsigned
//! integer `n` (`"0"`, `"42"`, not `"007"` or `"-1"`) shares a *page* with
//! the 63 integers next to it: page `n / 64`, slot `n % 64`. A page holds
//! each present slot's status and fingerprint, and a bit per slot saying
//! whether the key has a delete image; the image itself is one entry of
//! the `images` tree under [`image_key`]. An epoch of 10 000 consecutive
//! ids writes ~160 pages instead of 10 000 entries. Every other key lives
//! in a range page ([`super::ranges`]); which form a key takes depends on
//! its text only.
//!
//! Why images are not in the page: sled (0.34) counts a cache access per
//! tree operation and only evaluates its LRU once 64 accesses of one of
//! its 256 shards have queued up. A page of 64 ~280-byte images is ~18
//! KiB written with one access, so the nodes of a bulk load were never
//! evicted: RSS grew by ~350 bytes per record, far past the cache's
//! capacity. One small entry per image keeps the bytes per access small
//! and sled's cache bounded.
//!
//! Page keys are `[type][mapping hash][0xFF][page, 8 bytes big-endian]`:
//! 0xFF never occurs in UTF-8, so no per-key entry of the first layout
//! (whose suffix is the source key's UTF-8) shares or sorts into that range.
//!
//! Encodings: version 1, `[1][present: u64 BE]` then per present slot
//! `[status][fingerprint: u64 BE]` (no slot has an image); version 3, `[3]
//! [present][imaged: u64 BE]` then the same slots (a slot whose `imaged`
//! bit is set has its image in the `images` tree). Version 2 (each slot
//! followed by its image as `[varint len + 1][bytes]`, `0`: none) is still
//! read: a writer moves its images to the `images` tree when it rewrites
//! the page ([`Page::take_inline_images`]).

use bytes::Bytes;

use super::keycode::{canonical_u64, get_varint};
use super::{decode_fixed, encode_fixed, KeyState, KeyStatus, FIXED_BYTES};

/// Slots per page.
pub const SLOTS: u64 = 64;

/// Marks a page key after the mapping prefix.
pub const PAGE_MARK: u8 = 0xFF;

/// First byte of an encoded page without images (format version).
const VERSION: u8 = 1;

/// First byte of an encoded page with images inline (read only).
const VERSION_IMAGES: u8 = 2;

/// First byte of an encoded page whose images are in the `images` tree.
const VERSION_IMAGED: u8 = 3;

/// Bytes of one slot: status and fingerprint, as in a per-key entry.
const SLOT_BYTES: usize = FIXED_BYTES;

/// The page and slot of a source key, if it is a canonical unsigned
/// integer (the text `u64::to_string` would give back).
pub fn locate(source_key: &str) -> Option<(u64, u8)> {
    let n = canonical_u64(source_key)?;
    Some((n / SLOTS, (n % SLOTS) as u8))
}

/// The source key at `slot` of `page`.
pub fn source_key(page: u64, slot: u8) -> String {
    (page * SLOTS + u64::from(slot)).to_string()
}

/// The page key under a mapping prefix.
pub fn page_key(prefix: &[u8], page: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 9);
    k.extend_from_slice(prefix);
    k.push(PAGE_MARK);
    k.extend_from_slice(&page.to_be_bytes());
    k
}

/// The page number of a page key (`None` if it is not one).
pub fn page_of_key(prefix_len: usize, key: &[u8]) -> Option<u64> {
    let rest = key.get(prefix_len..)?;
    if rest.len() != 9 || rest[0] != PAGE_MARK {
        return None;
    }
    Some(u64::from_be_bytes(rest[1..].try_into().ok()?))
}

/// The `images` tree key of a slot's delete image: the page key and the
/// slot (keys of consecutive ids are consecutive, so a bulk load appends).
pub fn image_key(page_key: &[u8], slot: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(page_key.len() + 1);
    k.extend_from_slice(page_key);
    k.push(slot);
    k
}

/// One slot: status, fingerprint, delete image held inline (only in a
/// page read in version 2).
type Slot = (KeyStatus, u64, Option<Bytes>);

fn slot_state((status, fingerprint, image): &Slot) -> KeyState {
    KeyState {
        status: *status,
        fingerprint: *fingerprint,
        delete_image: image.clone(),
    }
}

/// One page: which slots are present, their states, and which have a
/// delete image in the `images` tree.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    present: u64,
    imaged: u64,
    slots: Vec<Slot>,
}

impl Page {
    /// No slot present.
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    fn index(&self, slot: u8) -> usize {
        (self.present & ((1u64 << slot) - 1)).count_ones() as usize
    }

    fn has(&self, slot: u8) -> bool {
        self.present & (1u64 << slot) != 0
    }

    /// The state at `slot`. Its delete image is only there if it was
    /// inline (version 2): see [`Page::has_stored_image`].
    pub fn get(&self, slot: u8) -> Option<KeyState> {
        self.has(slot)
            .then(|| slot_state(&self.slots[self.index(slot)]))
    }

    /// Whether `slot`'s delete image is in the `images` tree.
    pub fn has_stored_image(&self, slot: u8) -> bool {
        self.imaged & (1u64 << slot) != 0
    }

    /// Sets `slot`; its image (if any) is to be written to the `images`
    /// tree by the caller: the page only records that there is one.
    pub fn set(&mut self, slot: u8, state: &KeyState) {
        let i = self.index(slot);
        let v = (state.status, state.fingerprint, None);
        if state.delete_image.is_some() {
            self.imaged |= 1u64 << slot;
        } else {
            self.imaged &= !(1u64 << slot);
        }
        if self.has(slot) {
            self.slots[i] = v;
        } else {
            self.slots.insert(i, v);
            self.present |= 1u64 << slot;
        }
    }

    /// Clears `slot`; true if it was present.
    pub fn clear(&mut self, slot: u8) -> bool {
        if !self.has(slot) {
            return false;
        }
        let i = self.index(slot);
        self.slots.remove(i);
        self.present &= !(1u64 << slot);
        self.imaged &= !(1u64 << slot);
        true
    }

    /// Moves the images held inline (a version 2 page) out of the page,
    /// marking their slots as having a stored image: the caller writes
    /// them to the `images` tree before the page.
    pub fn take_inline_images(&mut self) -> Vec<(u8, Bytes)> {
        let present: Vec<u8> = self.slots_present().collect();
        let mut out = Vec::new();
        for (slot, v) in present.into_iter().zip(self.slots.iter_mut()) {
            if let Some(image) = v.2.take() {
                self.imaged |= 1u64 << slot;
                out.push((slot, image));
            }
        }
        out
    }

    /// Present slots in order, with their states.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (u8, KeyState)> + '_ {
        self.slots_present()
            .zip(self.slots.iter())
            .map(|(s, v)| (s, slot_state(v)))
    }

    /// Present slots in order, with their statuses.
    pub fn statuses(&self) -> impl Iterator<Item = (u8, KeyStatus)> + '_ {
        self.slots_present()
            .zip(self.slots.iter())
            .map(|(s, v)| (s, v.0))
    }

    fn slots_present(&self) -> impl Iterator<Item = u8> + '_ {
        (0..SLOTS as u8).filter(|&s| self.has(s))
    }

    /// The page's bytes (version 1 unless a slot has a stored image).
    /// Inline images (of a version 2 page) must have been taken out first
    /// ([`Page::take_inline_images`]).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(
            self.slots.iter().all(|s| s.2.is_none()),
            "inline images left"
        );
        let imaged = self.imaged != 0;
        let mut v = Vec::with_capacity(17 + self.slots.len() * SLOT_BYTES);
        v.push(if imaged { VERSION_IMAGED } else { VERSION });
        v.extend_from_slice(&self.present.to_be_bytes());
        if imaged {
            v.extend_from_slice(&self.imaged.to_be_bytes());
        }
        for (status, fp, _) in &self.slots {
            encode_fixed(*status, *fp, &mut v);
        }
        v
    }

    /// Decodes [`Page::encode`]'s bytes; `None` if they are not a page.
    pub fn decode(b: &[u8]) -> Option<Page> {
        if b.len() < 9 || !matches!(b[0], VERSION | VERSION_IMAGES | VERSION_IMAGED) {
            return None;
        }
        let images = b[0] == VERSION_IMAGES;
        let present = u64::from_be_bytes(b[1..9].try_into().ok()?);
        let mut body = &b[9..];
        let mut imaged = 0;
        if b[0] == VERSION_IMAGED {
            imaged = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
            body = &body[8..];
            if imaged & !present != 0 {
                return None;
            }
        }
        let n = present.count_ones() as usize;
        if !images && body.len() != n * SLOT_BYTES {
            return None;
        }
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            let (status, fp) = decode_fixed(body)?;
            body = &body[SLOT_BYTES..];
            let mut image = None;
            if images {
                let (len, h) = get_varint(body)?;
                body = &body[h..];
                if len > 0 {
                    let len = usize::try_from(len - 1).ok()?;
                    image = Some(Bytes::copy_from_slice(body.get(..len)?));
                    body = &body[len..];
                }
            }
            slots.push((status, fp, image));
        }
        body.is_empty().then_some(Page {
            present,
            imaged,
            slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::encode_fixed;

    fn st(fp: u64) -> KeyState {
        KeyState {
            status: KeyStatus::Accepted,
            fingerprint: fp,
            delete_image: None,
        }
    }

    #[test]
    fn only_canonical_unsigned_integers_have_a_page() {
        assert_eq!(locate("0"), Some((0, 0)));
        assert_eq!(locate("63"), Some((0, 63)));
        assert_eq!(locate("64"), Some((1, 0)));
        assert_eq!(locate("1000001"), Some((15625, 1)));
        assert_eq!(locate("18446744073709551615"), Some((u64::MAX / 64, 63)));
        for not in [
            "",
            "007",
            "00",
            "-1",
            "+1",
            "1.0",
            "1e3",
            " 1",
            "1|2",
            "abc",
            "18446744073709551616",
            "١٢",
        ] {
            assert_eq!(locate(not), None, "{not:?}");
        }
        for n in [0u64, 1, 63, 64, 65, 999_999, u64::MAX] {
            let (p, s) = locate(&n.to_string()).unwrap();
            assert_eq!(source_key(p, s), n.to_string());
        }
    }

    #[test]
    fn page_keys_round_trip_and_never_look_like_a_source_key() {
        let prefix = [3u8, 1, 2, 3, 4, 5, 6, 7, 8];
        let k = page_key(&prefix, 12345);
        assert_eq!(page_of_key(prefix.len(), &k), Some(12345));
        assert!(std::str::from_utf8(&k[prefix.len()..]).is_err());
        let mut per_key = prefix.to_vec();
        per_key.extend_from_slice(b"12345");
        assert_eq!(page_of_key(prefix.len(), &per_key), None);
        // Page keys sort after every per-key entry of the prefix.
        assert!(k > per_key);
    }

    #[test]
    fn slots_set_clear_and_round_trip() {
        let mut p = Page::default();
        assert!(p.is_empty());
        p.set(63, &st(63));
        p.set(0, &st(0));
        p.set(17, &st(17));
        p.set(17, &st(1700));
        p.set(
            5,
            &KeyState {
                status: KeyStatus::DeadLettered,
                fingerprint: 5,
                delete_image: Some(bytes::Bytes::from_static(b"\x01\x02")),
            },
        );
        assert_eq!(p.get(17), Some(st(1700)));
        assert_eq!(p.get(5).unwrap().status, KeyStatus::DeadLettered);
        // The image itself is not in the page (the `images` tree has it):
        // the page is version 3, eight bytes of image bits longer.
        assert!(p.has_stored_image(5) && !p.has_stored_image(17));
        assert_eq!(p.get(5).unwrap().delete_image, None);
        assert_eq!(p.encode()[0], 3);
        assert_eq!(p.encode().len(), 17 + 4 * 9);
        assert_eq!(Page::decode(&p.encode()).unwrap(), p);
        p.set(5, &st(5));
        assert!(!p.has_stored_image(5));
        assert_eq!(p.get(1), None);
        let slots: Vec<u8> = p.iter().map(|(s, _)| s).collect();
        assert_eq!(slots, [0, 5, 17, 63]);
        let back = Page::decode(&p.encode()).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.encode()[0], 1);
        assert_eq!(p.encode().len(), 9 + 4 * 9);
        assert!(p.clear(17));
        assert!(!p.clear(17));
        assert_eq!(p.get(63), Some(st(63)));
        assert_eq!(p.iter().count(), 3);
        for s in 0..64 {
            p.set(s, &st(u64::from(s) * 7));
        }
        assert_eq!(p.encode().len(), 9 + 64 * 9);
        assert_eq!(Page::decode(&p.encode()).unwrap().get(40), Some(st(280)));
    }

    #[test]
    fn a_page_of_imaged_slots_stays_small() {
        // 64 keys with ~280-byte images: the page is status, fingerprint
        // and a bit per slot (~600 bytes), not ~18 KiB of images.
        let mut p = Page::default();
        for s in 0..64 {
            p.set(
                s,
                &KeyState {
                    status: KeyStatus::Accepted,
                    fingerprint: u64::from(s),
                    delete_image: Some(Bytes::from(vec![s; 280])),
                },
            );
        }
        assert_eq!(p.encode().len(), 17 + 64 * SLOT_BYTES);
        assert!((0..64).all(|s| p.has_stored_image(s)));
        assert!(p.clear(3));
        assert!(!p.has_stored_image(3));
        assert_eq!(Page::decode(&p.encode()).unwrap(), p);
    }

    #[test]
    fn a_version_2_page_is_read_and_gives_its_images_up() {
        // [2][present] then per slot [status][fp][varint len + 1][image].
        let mut v = vec![2u8];
        v.extend_from_slice(&((1u64 << 1) | (1u64 << 7)).to_be_bytes());
        encode_fixed(KeyStatus::Accepted, 11, &mut v);
        v.extend_from_slice(&[3, b'a', b'b']);
        encode_fixed(KeyStatus::DeadLettered, 77, &mut v);
        v.push(0);
        let mut p = Page::decode(&v).unwrap();
        assert_eq!(p.get(1).unwrap().delete_image.as_deref(), Some(&b"ab"[..]));
        assert_eq!(p.get(7).unwrap().fingerprint, 77);
        assert_eq!(
            p.take_inline_images(),
            vec![(1u8, Bytes::from_static(b"ab"))]
        );
        assert!(p.has_stored_image(1) && !p.has_stored_image(7));
        let back = Page::decode(&p.encode()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.get(1).unwrap().delete_image, None);
        // Image bits outside the present slots are damage.
        let mut bad = p.encode();
        bad[9 + 7] |= 1;
        assert!(Page::decode(&bad).is_none());
    }

    #[test]
    fn damaged_pages_are_refused() {
        let mut p = Page::default();
        p.set(1, &st(1));
        let good = p.encode();
        assert!(Page::decode(&good[..good.len() - 1]).is_none());
        let mut bad = good.clone();
        bad[0] = 9;
        assert!(Page::decode(&bad).is_none());
        let mut bad = good;
        bad[9] = 7;
        assert!(Page::decode(&bad).is_none());
    }
}
