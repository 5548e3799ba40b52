//! How the sled store lays keys out: integer pages, range pages and their
//! splits, delete images outside their page, older page formats read and
//! converted, the first layout migrated.

use super::*;

#[test]
fn keys_with_long_common_prefixes_lose_nothing() {
    // Synthetic UUIDs (twelve zero bytes, then a counter) and text keys
    // that differ only at their end: pages still split between keys.
    let dir = tempfile::tempdir().unwrap();
    let s = paged(dir.path());
    let keys: Vec<StateKey> = (0..3000u64)
        .flat_map(|n| {
            [
                key("transactions", &format!("00000000-0000-0000-0000-{n:012x}")),
                key(
                    "transactions",
                    &format!("CUSTOMER-ACCOUNT-REFERENCE-{n:08}"),
                ),
            ]
        })
        .collect();
    for chunk in keys.chunks(1000) {
        let writes: Vec<Write> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| Write::Key(k.clone(), accepted(i as u64, None)))
            .collect();
        s.apply(&writes).unwrap();
    }
    let refs: Vec<&StateKey> = keys.iter().collect();
    let got = s.get_keys(&refs).unwrap();
    assert!(got.iter().all(Option::is_some));
    let k = &keys[0];
    assert!(s.range_pages(k.ty, &k.mapping) > 100);
    assert_eq!(s.keys_of(k.ty, &k.mapping).unwrap().len(), 6000);
}

#[test]
fn a_snapshot_in_key_order_appends_pages() {
    // Sorted UUID keys (a table read in key order) fill pages in order:
    // each epoch writes about as many pages as its keys fill, and a
    // lookup of the next epoch's (new) keys reads one page.
    let dir = tempfile::tempdir().unwrap();
    let s = paged(dir.path());
    let mut all: Vec<String> = (0..20_000u64).map(uuid_key).collect();
    all.sort();
    for chunk in all.chunks(5000) {
        let before = s.entries_in_keys_tree().unwrap();
        let writes: Vec<Write> = chunk
            .iter()
            .map(|u| Write::Key(key("transactions", u), accepted(1, None)))
            .collect();
        s.apply(&writes).unwrap();
        let added = s.entries_in_keys_tree().unwrap() - before;
        // ~27 bytes a key, pages of ~TARGET_BYTES.
        let fill = 5000 * 27 / ranges::TARGET_BYTES;
        assert!(
            (fill - 5..=fill + 5).contains(&added),
            "{added} pages for {fill}"
        );
    }
}

#[test]
fn sled_store_pages_integer_keys() {
    // 10 000 consecutive ids take ~157 entries in the keys tree, not 10 000.
    let dir = tempfile::tempdir().unwrap();
    let s = paged(dir.path());
    let writes: Vec<Write> = (1..=10_000u64)
        .map(|n| Write::Key(key("transactions", &n.to_string()), accepted(n, None)))
        .collect();
    s.apply(&writes).unwrap();
    assert_eq!(s.entries_in_keys_tree().unwrap(), 10_000 / 64 + 1);
}

#[test]
fn sled_store_pages_uuid_keys_and_splits_them_as_they_grow() {
    // 20 000 UUID keys written in epochs of 2 000: a few hundred pages of
    // at most MAX_BYTES, not 20 000 entries; every key readable after
    // each epoch and after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let k = |n: u64| key("transactions", &uuid_key(n));
    {
        let s = paged(dir.path());
        for epoch in 0..10u64 {
            let writes: Vec<Write> = (epoch * 2000..(epoch + 1) * 2000)
                .map(|n| Write::Key(k(n), accepted(n, None)))
                .collect();
            s.apply(&writes).unwrap();
            let keys: Vec<StateKey> = (0..(epoch + 1) * 2000).map(k).collect();
            let refs: Vec<&StateKey> = keys.iter().collect();
            let got = s.get_keys(&refs).unwrap();
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(n, g)| g.as_ref().map(|g| g.fingerprint) == Some(n as u64)),
                "epoch {epoch}"
            );
        }
        let entries = s.entries_in_keys_tree().unwrap();
        assert!(
            (20_000 * 27 / ranges::MAX_BYTES..=20_000 * 27 / (ranges::TARGET_BYTES / 2))
                .contains(&entries),
            "{entries} pages"
        );
        for (pk, v) in s.keys_tree().iter().map(Result::unwrap) {
            assert!(v.len() <= ranges::MAX_BYTES, "{pk:?}: {} bytes", v.len());
        }
        s.flush().unwrap();
    }
    let s = paged(dir.path());
    let listed = s.keys_of(k(0).ty, &k(0).mapping).unwrap();
    assert_eq!(listed.len(), 20_000);
    assert_eq!(s.get_key(&k(12_345)).unwrap().unwrap().fingerprint, 12_345);
}

#[test]
fn integer_keys_keep_their_images_outside_their_page() {
    // A page of 64 imaged keys stays ~600 bytes (sled evicts small writes;
    // see `pages`); images come back, change, and go with their keys,
    // also after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let k = |n: u64| key("transactions", &n.to_string());
    let img = |n: u64| format!("image {n} {}", "x".repeat(270));
    {
        let s = paged(dir.path());
        let writes: Vec<Write> = (0..64)
            .map(|n| Write::Key(k(n), accepted(n, Some(&img(n)))))
            .collect();
        s.apply(&writes).unwrap();
        for (pk, v) in s.keys_tree().iter().map(Result::unwrap) {
            assert!(
                v.len() <= 17 + 64 * FIXED_BYTES,
                "{pk:?}: {} bytes",
                v.len()
            );
        }
        s.apply(&[
            Write::Key(k(1), accepted(100, None)),
            Write::Key(k(2), accepted(200, Some("new"))),
            Write::RemoveKey(k(3)),
        ])
        .unwrap();
        s.flush().unwrap();
    }
    let s = paged(dir.path());
    assert_eq!(s.get_key(&k(0)).unwrap(), Some(accepted(0, Some(&img(0)))));
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(100, None)));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(200, Some("new"))));
    assert_eq!(s.get_key(&k(3)).unwrap(), None);
    assert_eq!(
        s.get_key(&k(63)).unwrap(),
        Some(accepted(63, Some(&img(63))))
    );
    // A key that comes back has no image left over from before.
    s.apply(&[Write::Key(k(3), accepted(3, None))]).unwrap();
    assert_eq!(s.get_key(&k(3)).unwrap(), Some(accepted(3, None)));
    // The 64 keys' images are in 8 group entries (not one per key); a
    // group whose images all go is removed.
    assert_eq!(s.images_tree().len(), 8);
    let gone: Vec<Write> = (8..16).map(|n| Write::RemoveKey(k(n))).collect();
    s.apply(&gone).unwrap();
    assert_eq!(s.images_tree().len(), 7);
    assert_eq!(
        s.get_key(&k(16)).unwrap(),
        Some(accepted(16, Some(&img(16))))
    );
}

#[test]
fn a_page_with_per_slot_images_is_read_and_regrouped_when_rewritten() {
    // The previous page format (version 3) kept each image in its own
    // entry of the `images` tree, under the page key and the slot.
    let dir = tempfile::tempdir().unwrap();
    let s = paged(dir.path());
    let k = |n: u64| key("transactions", &n.to_string());
    let prefix = StateKey::mapping_prefix(k(0).ty, &k(0).mapping);
    let pk = pages::page_key(&prefix, 0);
    let v = v3_page(&[1, 2, 9], &[1, 9]);
    s.keys_tree().insert(&pk, v).unwrap();
    let per_slot = |slot: u8| pages::image_key(&pk, slot);
    s.images_tree().insert(per_slot(1), &b"one"[..]).unwrap();
    // Slot 9 is marked but its entry is missing: read without an image.
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("one"))));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(2, None)));
    assert_eq!(s.get_key(&k(9)).unwrap(), Some(accepted(9, None)));
    s.apply(&[Write::Key(k(5), accepted(5, Some("five")))])
        .unwrap();
    let page = s.keys_tree().get(&pk).unwrap().unwrap();
    assert_eq!(page[0], 4);
    assert_eq!(s.images_tree().get(per_slot(1)).unwrap(), None);
    assert_eq!(s.images_tree().len(), 1, "one group for slots 0..8");
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("one"))));
    assert_eq!(s.get_key(&k(5)).unwrap(), Some(accepted(5, Some("five"))));
    assert_eq!(s.get_key(&k(9)).unwrap(), Some(accepted(9, None)));
}

#[test]
fn a_page_with_images_inline_is_read_and_converted_when_rewritten() {
    // The previous page format (version 2) held images inline.
    let dir = tempfile::tempdir().unwrap();
    let s = paged(dir.path());
    let k = |n: u64| key("transactions", &n.to_string());
    let prefix = StateKey::mapping_prefix(k(0).ty, &k(0).mapping);
    let mut v = vec![2u8];
    v.extend_from_slice(&((1u64 << 1) | (1u64 << 2)).to_be_bytes());
    encode_fixed(KeyStatus::Accepted, 1, &mut v);
    v.extend_from_slice(&[4, b'o', b'l', b'd']);
    encode_fixed(KeyStatus::Accepted, 2, &mut v);
    v.push(0);
    s.keys_tree()
        .insert(pages::page_key(&prefix, 0), v)
        .unwrap();
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("old"))));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(2, None)));
    // Rewriting another slot moves key 1's image out of the page.
    s.apply(&[Write::Key(k(5), accepted(5, Some("five")))])
        .unwrap();
    let page = s
        .keys_tree()
        .get(pages::page_key(&prefix, 0))
        .unwrap()
        .unwrap();
    assert_eq!(page[0], 4);
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("old"))));
    assert_eq!(s.get_key(&k(5)).unwrap(), Some(accepted(5, Some("five"))));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(2, None)));
}

#[test]
fn a_store_of_the_first_layout_is_converted_once() {
    let dir = tempfile::tempdir().unwrap();
    let tx = schema().type_id("transactions").unwrap();
    let u = uuid_key(1);
    let json = format!(
        r#"{{"transaction_id":"{u}","shop_id":"{u}","region":"GB","savings":0.1,"amount":12.5,"source":"online"}}"#
    );
    // The first layout: `[prefix][source key]` → `[status][fp][JSON]`.
    let legacy = |k: &StateKey, fp: u64, json: Option<&str>| {
        let mut v = Vec::new();
        encode_fixed(KeyStatus::Accepted, fp, &mut v);
        v.extend_from_slice(json.unwrap_or("").as_bytes());
        (k.encode(), v)
    };
    {
        let s = paged(dir.path());
        let t = s.keys_tree();
        let (k1, v1) = legacy(&key("transactions", &u), 10, Some(&json));
        t.insert(k1, v1).unwrap();
        let (k2, v2) = legacy(&key("transactions", "text-key"), 11, None);
        t.insert(k2, v2).unwrap();
        // Key 70: in its integer page (fingerprint 1), and — a crash
        // leftover of the first layout — as an entry with a record
        // (fingerprint 2), which was read first and so wins.
        s.apply(&[Write::Key(key("transactions", "70"), accepted(1, None))])
            .unwrap();
        let (k3, v3) = legacy(&key("transactions", "70"), 2, Some(&json));
        t.insert(k3, v3).unwrap();
        // A store written by the first layout has no layout marker.
        s.forget_layout_marker();
        s.flush().unwrap();
    }
    let s = paged(dir.path());
    let st = s.get_key(&key("transactions", &u)).unwrap().unwrap();
    assert_eq!(st.fingerprint, 10);
    let r = image::decode(tx, st.delete_image.as_ref().unwrap()).unwrap();
    let back = String::from_utf8(r.to_json()).unwrap();
    assert!(back.contains(r#""amount":12.5"#), "{back}");
    assert!(back.contains("online"), "optional fields kept: {back}");
    assert_eq!(
        s.get_key(&key("transactions", "text-key")).unwrap(),
        Some(accepted(11, None))
    );
    let st70 = s.get_key(&key("transactions", "70")).unwrap().unwrap();
    assert_eq!(st70.fingerprint, 2);
    assert!(st70.delete_image.is_some());
    // No entry of the first layout is left: only pages.
    for (k, _) in s.keys_tree().iter().map(Result::unwrap) {
        assert!(matches!(k[9], 0xFE | 0xFF), "{k:?}");
    }
    assert_eq!(sorted_states(&s).len(), 3);
}
