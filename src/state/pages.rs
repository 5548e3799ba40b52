//! Integer pages: how [`super::SledStore`] keeps the states of integer keys.
//!
//! Most partner tables have integer primary keys, and a snapshot or a
//! bulk load writes them in order. One sled entry per record made sled's
//! B-tree insert a third of the daemon's CPU and its memory grow by about
//! 20 bytes per key. So a key whose source key is a canonical unsigned
//! integer `n` (`"0"`, `"42"`, not `"007"` or `"-1"`) shares a *page* with
//! the 63 integers next to it: page `n / 64`, slot `n % 64`. A page holds
//! each present slot's status and fingerprint, and a bit per slot saying
//! whether the key has a delete image; the image itself is in the image
//! group of its slot ([`group_key`], below). An epoch of 10 000 consecutive
//! ids writes ~160 pages instead of 10 000 entries. Every other key lives
//! in a range page ([`super::ranges`]); which form a key takes depends on
//! its text only.
//!
//! Why images are not in the page: sled (0.34) counts a cache access per
//! tree operation and only evaluates its LRU once 64 accesses of one of
//! its 256 shards have queued up. A page of 64 ~280-byte images is ~18
//! KiB written with one access, so the nodes of a bulk load were never
//! evicted: RSS grew by ~350 bytes per record, far past the cache's
//! capacity. One entry per image kept sled's cache bounded but made a
//! bulk load one sled insert per record again (~13 µs of CPU per record,
//! ~310 bytes on disk). So images live in *image groups*: the images of
//! [`GROUP_SLOTS`] neighbouring slots in one `images` entry
//! ([`group_key`], [`Group`]), ~1–2 KiB, the size of a range page.
//!
//! Page keys are `[type][mapping hash][0xFF][page, 8 bytes big-endian]`:
//! 0xFF never occurs in UTF-8, so no per-key entry of the first layout
//! (whose suffix is the source key's UTF-8) shares or sorts into that range.
//!
//! Encodings: version 1, `[1][present: u64 BE]` then per present slot
//! `[status][fingerprint: u64 BE]` (no slot has an image); version 4, `[4]
//! [present][imaged: u64 BE]` then the same slots (a slot whose `imaged`
//! bit is set has its image in its image group). Earlier versions are
//! still read, and converted when a writer rewrites the page: version 2
//! (each slot followed by its image as `[varint len + 1][bytes]`, `0`:
//! none; [`Page::take_inline_images`]) and version 3 (as 4, but each image
//! in its own entry under [`image_key`]; [`Page::is_per_slot`]).

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

/// First byte of an encoded page whose images are in per-slot entries of
/// the `images` tree (read only).
const VERSION_PER_SLOT: u8 = 3;

/// First byte of an encoded page whose images are in image groups.
const VERSION_GROUPED: u8 = 4;

/// Slots whose images share one image group entry.
pub const GROUP_SLOTS: u8 = 8;

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

/// The `images` tree key of a slot's delete image in a version 3 page:
/// the page key and the slot.
pub fn image_key(page_key: &[u8], slot: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(page_key.len() + 1);
    k.extend_from_slice(page_key);
    k.push(slot);
    k
}

/// The `images` tree key of the image group holding `slot`'s image: the
/// page key and `0x80 + slot / 8` (never a version 3 slot key, `0..64`;
/// groups of consecutive ids are consecutive, so a bulk load appends).
pub fn group_key(page_key: &[u8], slot: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(page_key.len() + 1);
    k.extend_from_slice(page_key);
    k.push(0x80 | (slot / GROUP_SLOTS));
    k
}

/// The delete images of up to [`GROUP_SLOTS`] neighbouring slots of one
/// integer page. Encoding: `[present: u8]` (bit `slot % 8`), then per
/// present slot in order `[varint length][image]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Group {
    images: [Option<Bytes>; GROUP_SLOTS as usize],
}

impl Group {
    /// Decodes a stored group; `None` if the bytes are not one.
    pub fn decode(b: &[u8]) -> Option<Group> {
        let (&present, mut body) = b.split_first()?;
        let mut g = Group::default();
        for i in 0..GROUP_SLOTS {
            if present & (1 << i) == 0 {
                continue;
            }
            let (len, h) = get_varint(body)?;
            let end = h.checked_add(usize::try_from(len).ok()?)?;
            let image = body.get(h..end)?;
            g.images[usize::from(i)] = Some(Bytes::copy_from_slice(image));
            body = &body[end..];
        }
        body.is_empty().then_some(g)
    }

    /// The image of `slot` (of the page), if the group holds one.
    pub fn get(&self, slot: u8) -> Option<&Bytes> {
        self.images[usize::from(slot % GROUP_SLOTS)].as_ref()
    }

    /// Sets or removes `slot`'s image; true if that changed the group.
    pub fn set(&mut self, slot: u8, image: Option<Bytes>) -> bool {
        let at = &mut self.images[usize::from(slot % GROUP_SLOTS)];
        let changed = *at != image;
        *at = image;
        changed
    }

    /// No image left.
    pub fn is_empty(&self) -> bool {
        self.images.iter().all(Option::is_none)
    }

    /// The group's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let len: usize = self.images.iter().flatten().map(|i| i.len() + 2).sum();
        let mut v = Vec::with_capacity(1 + len);
        let mut present = 0u8;
        for (i, image) in self.images.iter().enumerate() {
            if image.is_some() {
                present |= 1 << i;
            }
        }
        v.push(present);
        for image in self.images.iter().flatten() {
            super::keycode::put_varint(image.len() as u64, &mut v);
            v.extend_from_slice(image);
        }
        v
    }
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
    /// Read in version 3: the images are in per-slot entries.
    per_slot: bool,
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

    /// Whether `slot`'s delete image is in the `images` tree (in its
    /// image group, or, see [`Page::is_per_slot`], its own entry).
    pub fn has_stored_image(&self, slot: u8) -> bool {
        self.imaged & (1u64 << slot) != 0
    }

    /// Whether the page was read in version 3 (each image in its own
    /// entry under [`image_key`]): a writer moves them into groups.
    pub fn is_per_slot(&self) -> bool {
        self.per_slot
    }

    /// The slots with a stored image, in order.
    pub fn imaged_slots(&self) -> impl Iterator<Item = u8> + '_ {
        (0..SLOTS as u8).filter(|&s| self.has_stored_image(s))
    }

    /// Marks the page as keeping its images in groups (after a writer
    /// has moved a version 3 page's images); a slot in `missing` had no
    /// image entry after all and loses its mark.
    pub fn regroup(&mut self, missing: &[u8]) {
        self.per_slot = false;
        for s in missing {
            self.imaged &= !(1u64 << s);
        }
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
        debug_assert!(!self.per_slot, "per-slot images left");
        v.push(if imaged { VERSION_GROUPED } else { VERSION });
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
        if b.len() < 9
            || !matches!(
                b[0],
                VERSION | VERSION_IMAGES | VERSION_PER_SLOT | VERSION_GROUPED
            )
        {
            return None;
        }
        let images = b[0] == VERSION_IMAGES;
        let present = u64::from_be_bytes(b[1..9].try_into().ok()?);
        let mut body = &b[9..];
        let mut imaged = 0;
        let per_slot = b[0] == VERSION_PER_SLOT;
        if per_slot || b[0] == VERSION_GROUPED {
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
            per_slot,
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
        // the page is version 4, eight bytes of image bits longer.
        assert!(p.has_stored_image(5) && !p.has_stored_image(17));
        assert_eq!(p.get(5).unwrap().delete_image, None);
        assert_eq!(p.encode()[0], 4);
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
    fn a_version_3_page_says_its_images_are_per_slot() {
        let mut p = Page::default();
        p.set(2, &st(2));
        p.set(
            9,
            &KeyState {
                delete_image: Some(Bytes::from_static(b"i")),
                ..st(9)
            },
        );
        let mut v = p.encode();
        v[0] = 3;
        let mut back = Page::decode(&v).unwrap();
        assert!(back.is_per_slot() && back.has_stored_image(9));
        assert_eq!(back.imaged_slots().collect::<Vec<_>>(), [9]);
        back.regroup(&[9]);
        assert!(!back.is_per_slot() && !back.has_stored_image(9));
        assert_eq!(back.encode()[0], 1);
    }

    #[test]
    fn image_groups_round_trip_and_refuse_damage() {
        let mut g = Group::default();
        assert!(g.is_empty());
        assert!(g.set(8 + 3, Some(Bytes::from_static(b"three"))));
        assert!(g.set(8 + 7, Some(Bytes::from(vec![7u8; 300]))));
        assert!(!g.set(8 + 3, Some(Bytes::from_static(b"three"))));
        assert!(g.set(8, Some(Bytes::new())));
        let b = g.encode();
        assert_eq!(b[0], 0b1000_1001);
        let back = Group::decode(&b).unwrap();
        assert_eq!(back, g);
        assert_eq!(back.get(3).map(|i| &i[..]), Some(&b"three"[..]));
        assert_eq!(back.get(8).map(|i| i.len()), Some(0));
        assert_eq!(back.get(5), None);
        for cut in 0..b.len() {
            assert!(Group::decode(&b[..cut]).is_none(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Group::decode(&long).is_none());
        assert!(g.set(3, None) && g.set(7, None) && g.set(0, None));
        assert!(g.is_empty());
        // Group keys never collide with version 3 slot keys, and
        // consecutive slots' groups sort in order.
        let pk = page_key(&[1u8; 9], 5);
        assert_eq!(group_key(&pk, 0), group_key(&pk, 7));
        assert!(group_key(&pk, 7) < group_key(&pk, 8));
        assert!((0..64).all(|s| image_key(&pk, s) < group_key(&pk, 0)));
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
