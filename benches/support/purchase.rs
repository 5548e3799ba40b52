//! The mappings of the benchmarks' `purchase` table (and the `merchant`
//! shops it references), shared by `e2e.rs` and `hot_path.rs`.

/// `[[mapping]]` blocks for shops and transactions.
pub const MAPPINGS: &str = r#"
[[mapping]]
type = "shops"
table = "public.merchant"
cursor = "modified_at"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
updated = "modified_at"

[[mapping]]
type = "transactions"
table = "public.purchase"
cursor = "modified_at"
[mapping.fields]
transaction_id = { column = "id", transform = "uuid5" }
student_id = { column = "member_ref", transform = "uuid5:customers" }
shop_id = { column = "shop_ref", transform = "uuid5:shops" }
offer_id = { column = "promo_ref", transform = "uuid5:offers" }
branch_id = { column = "outlet_ref", transform = "uuid5:branches" }
region = { column = "country", transform = "upper" }
source = "channel"
savings = "saved"
amount = "total"
updated = "modified_at"
"#;
