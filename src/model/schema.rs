//! The Cobi Data API's record types, read from the `schema.json` compiled
//! into the binary.
//!
//! Nothing here is typed in by hand: the 15 types, their paths, keys,
//! fields, formats, enums, references and dependency edges all come from
//! `src/model/schema.json` (a copy of `shared/cobi-api/schema.json`). The
//! upload order is computed from the dependency graph, and the graph is
//! checked to be acyclic when the schema is loaded.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// The schema file, embedded at compile time.
pub const SCHEMA_JSON: &str = include_str!("schema.json");

/// Index of a record type in [`Schema::types`]. Types are stored in upload
/// (topological) order, so `a < b` means `a` is uploaded before `b`.
pub type TypeId = u8;
/// Index of a field in [`TypeDef::fields`].
pub type FieldId = u8;

/// JSON type of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// JSON string.
    String,
    /// JSON number.
    Number,
    /// JSON integer.
    Integer,
    /// JSON boolean.
    Boolean,
    /// An integer or a string (`interactions.event_timestamp`).
    IntegerOrString,
}

/// String formats the schema names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A UUID.
    Uuid,
    /// RFC 3339 `date-time`.
    DateTime,
    /// `YYYY-MM-DD`.
    Date,
    /// ISO 3166-1 alpha-2 (`pattern` `^[A-Z]{2}$`).
    CountryCode,
    /// A comma-separated list in one string.
    CommaSeparatedList,
    /// A float (`number` fields).
    Float,
    /// A positive integer or an RFC 3339 string.
    EpochIntegerOrIsoDateTime,
}

/// A field's reference to a parent type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// Always the same parent type.
    To {
        /// The parent type.
        ty: TypeId,
        /// Whether the API says it checks the reference.
        validated: bool,
    },
    /// The parent type is chosen by another field's value
    /// (`interactions.item_id` by `item_type`).
    ByField {
        /// The field holding the discriminator.
        field: FieldId,
        /// Discriminator value → parent type.
        targets: Vec<(String, TypeId)>,
        /// Whether the API says it checks the reference.
        validated: bool,
    },
}

/// One field of a record type.
#[derive(Debug, Clone)]
pub struct FieldDef {
    /// Field name as sent to the API.
    pub name: String,
    /// JSON type.
    pub ty: FieldType,
    /// String or number format.
    pub format: Option<Format>,
    /// Must be present and non-null.
    pub required: bool,
    /// May be sent as `null`.
    pub nullable: bool,
    /// Allowed values (`None` inside means `null` is allowed).
    pub enumeration: Option<Vec<Option<String>>>,
    /// Inclusive lower bound.
    pub minimum: Option<f64>,
    /// Exclusive lower bound.
    pub exclusive_minimum: Option<f64>,
    /// Inclusive range inferred from the field's notes (latitude/longitude).
    pub range: Option<(f64, f64)>,
    /// The parent this field points at, if any.
    pub reference: Option<Reference>,
}

/// One record type of the Data API.
#[derive(Debug, Clone)]
pub struct TypeDef {
    /// Type name as in the URL (`shops`, `shop-categories`, `user-interactions`).
    pub name: String,
    /// Other accepted names (`interactions`).
    pub aliases: Vec<String>,
    /// Request path (`/v1/data/shops`, `/user-interactions`).
    pub path: String,
    /// Whether records go in a `{"records": [...]}` batch (false: one object
    /// per request).
    pub batch: bool,
    /// HTTP status of success (200, or 201 for interactions).
    pub success_status: u16,
    /// Key fields (empty for interactions; `favourite_id` is optional, see
    /// [`TypeDef::natural_key`]).
    pub key: Vec<FieldId>,
    /// Fields, in schema order.
    pub fields: Vec<FieldDef>,
    /// Parent types (every edge of `dependencies`, documented and inferred).
    pub parents: Vec<TypeId>,
    /// Longest chain of parents above this type (roots are level 0). Types
    /// of one level never depend on each other.
    pub level: u8,
}

impl TypeDef {
    /// Looks a field up by name.
    pub fn field(&self, name: &str) -> Option<FieldId> {
        self.fields
            .iter()
            .position(|f| f.name == name)
            .map(|i| i as FieldId)
    }

    /// Whether the name (or an alias) designates this type.
    pub fn is_named(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }

    /// The fields that identify a record at the API when the declared key
    /// is optional or absent: the key if every key field is required,
    /// otherwise the required reference fields (student-favourites:
    /// `student_id` + `shop_id`, a guess SPEC.md §4.13 calls inferred).
    pub fn natural_key(&self) -> Vec<FieldId> {
        if !self.key.is_empty() && self.key.iter().all(|&k| self.fields[k as usize].required) {
            return self.key.clone();
        }
        if self.key.is_empty() {
            return Vec::new();
        }
        self.fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.required && f.reference.is_some())
            .map(|(i, _)| i as FieldId)
            .collect()
    }
}

/// All record types, in upload order.
#[derive(Debug)]
pub struct Schema {
    /// Types sorted topologically (parents first).
    pub types: Vec<TypeDef>,
    /// Largest [`TypeDef::level`].
    pub max_level: u8,
    /// Maximum records per batch request.
    pub max_records_per_request: usize,
}

impl Schema {
    /// Looks a type up by name or alias (`interactions` → `user-interactions`).
    pub fn type_id(&self, name: &str) -> Option<TypeId> {
        self.types
            .iter()
            .position(|t| t.is_named(name))
            .map(|i| i as TypeId)
    }

    /// The type definition.
    pub fn ty(&self, id: TypeId) -> &TypeDef {
        &self.types[id as usize]
    }

    /// Every type name, in upload order.
    pub fn type_names(&self) -> Vec<&str> {
        self.types.iter().map(|t| t.name.as_str()).collect()
    }

    /// `ty` and every type it depends on, transitively.
    pub fn with_ancestors(&self, ty: TypeId) -> Vec<TypeId> {
        let mut out = vec![ty];
        let mut i = 0;
        while i < out.len() {
            for &p in &self.ty(out[i]).parents {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            i += 1;
        }
        out.sort_unstable();
        out
    }
}

/// The schema compiled into this binary.
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| load(SCHEMA_JSON).expect("embedded schema.json is valid"))
}

// ---- loading -------------------------------------------------------------

#[derive(Deserialize)]
struct RawSchema {
    request_envelope: RawEnvelope,
    types: BTreeMap<String, RawType>,
    dependencies: BTreeMap<String, Vec<String>>,
    order: Vec<String>,
}

#[derive(Deserialize)]
struct RawEnvelope {
    max_records_per_request: usize,
}

#[derive(Deserialize)]
struct RawType {
    path: String,
    #[serde(default)]
    aliases: Vec<String>,
    key: Vec<String>,
    #[serde(default)]
    batch: Option<bool>,
    #[serde(default)]
    success_status: Option<u16>,
    // serde_json preserves object order only with `preserve_order`; the
    // field order is recovered from the raw text in `field_order`.
    fields: BTreeMap<String, RawField>,
}

#[derive(Deserialize)]
struct RawField {
    #[serde(rename = "type")]
    ty: serde_json::Value,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    nullable: bool,
    #[serde(default, rename = "enum")]
    enumeration: Option<Vec<Option<String>>>,
    #[serde(default)]
    minimum: Option<f64>,
    #[serde(default, rename = "exclusiveMinimum")]
    exclusive_minimum: Option<f64>,
    #[serde(default)]
    references: Option<String>,
    #[serde(default)]
    references_by: Option<String>,
    #[serde(default)]
    reference_status: Option<String>,
    #[serde(default)]
    notes: Option<String>,
}

/// Why the schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Not valid JSON of the expected shape.
    #[error("schema.json: {0}")]
    Json(#[from] serde_json::Error),
    /// Inconsistent content.
    #[error("schema.json: {0}")]
    Invalid(String),
}

/// Field names of one type in the order they appear in the file.
fn field_order(text: &str, type_name: &str) -> Result<Vec<String>, SchemaError> {
    // Walk the JSON with serde_json's streaming Value, which keeps order for
    // RawValue: parse `types.<name>.fields` as a raw map.
    #[derive(Deserialize)]
    struct Types<'a> {
        #[serde(borrow)]
        types: BTreeMap<String, &'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct Ty<'a> {
        #[serde(borrow)]
        fields: &'a serde_json::value::RawValue,
    }
    let types: Types = serde_json::from_str(text)?;
    let raw = types
        .types
        .get(type_name)
        .ok_or_else(|| SchemaError::Invalid(format!("type {type_name} missing")))?;
    let ty: Ty = serde_json::from_str(raw.get())?;
    let mut names = Vec::new();
    let mut de = serde_json::Deserializer::from_str(ty.fields.get());
    struct Keys<'n>(&'n mut Vec<String>);
    impl<'de> serde::de::Visitor<'de> for Keys<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of fields")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                self.0.push(k);
            }
            Ok(())
        }
    }
    serde::Deserializer::deserialize_map(&mut de, Keys(&mut names))?;
    Ok(names)
}

/// Parses a schema text and computes the upload order.
pub fn load(text: &str) -> Result<Schema, SchemaError> {
    let raw: RawSchema = serde_json::from_str(text)?;
    let names: Vec<String> = raw.types.keys().cloned().collect();
    let resolve = |n: &str| -> Option<usize> {
        names.iter().position(|x| x == n).or_else(|| {
            raw.types
                .iter()
                .position(|(_, t)| t.aliases.iter().any(|a| a == n))
        })
    };

    // Dependency edges (child -> parents), by index into `names`.
    let mut parents: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
    for (child, ps) in &raw.dependencies {
        let c = resolve(child)
            .ok_or_else(|| SchemaError::Invalid(format!("dependencies: unknown type {child}")))?;
        for p in ps {
            let p = resolve(p).ok_or_else(|| {
                SchemaError::Invalid(format!("dependencies of {child}: unknown type {p}"))
            })?;
            if !parents[c].contains(&p) {
                parents[c].push(p);
            }
        }
    }

    // Kahn's algorithm; ties broken by the schema's documented `order`, so
    // the result is deterministic and matches SPEC.md when it can.
    let hint = |i: usize| {
        raw.order
            .iter()
            .position(|n| resolve(n) == Some(i))
            .unwrap_or(usize::MAX)
    };
    let mut indeg: Vec<usize> = parents.iter().map(|p| p.len()).collect();
    let mut done = vec![false; names.len()];
    let mut order = Vec::with_capacity(names.len());
    while order.len() < names.len() {
        let next = (0..names.len())
            .filter(|&i| !done[i] && indeg[i] == 0)
            .min_by_key(|&i| (hint(i), i));
        let Some(n) = next else {
            let cyclic: Vec<&str> = (0..names.len())
                .filter(|&i| !done[i])
                .map(|i| names[i].as_str())
                .collect();
            return Err(SchemaError::Invalid(format!(
                "dependency cycle among {}",
                cyclic.join(", ")
            )));
        };
        done[n] = true;
        order.push(n);
        for (c, ps) in parents.iter().enumerate() {
            if ps.contains(&n) {
                indeg[c] -= 1;
            }
        }
    }
    let position = |i: usize| order.iter().position(|&o| o == i).expect("ordered") as TypeId;

    let mut types = Vec::with_capacity(order.len());
    for &i in &order {
        let name = &names[i];
        let rt = &raw.types[name];
        let field_names = field_order(text, name)?;
        let mut fields = Vec::with_capacity(field_names.len());
        for fname in &field_names {
            let rf = &rt.fields[fname];
            fields.push(field_def(fname, rf)?);
        }
        // References need field indices and type ids: second pass.
        for (fi, fname) in field_names.iter().enumerate() {
            let rf = &rt.fields[fname];
            let Some(refs) = &rf.references else { continue };
            let validated = rf
                .reference_status
                .as_deref()
                .is_some_and(|s| s.starts_with("documented"));
            let targets: Vec<usize> = refs
                .split('|')
                .map(|r| {
                    let tname = r.split('.').next().unwrap_or(r);
                    resolve(tname)
                })
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default();
            if targets.is_empty() {
                // e.g. recommendations.recommendation_id: not an upload type.
                continue;
            }
            let reference = if let Some(by) = &rf.references_by {
                let by_field = field_names.iter().position(|n| n == by).ok_or_else(|| {
                    SchemaError::Invalid(format!(
                        "{name}.{fname}: references_by unknown field {by}"
                    ))
                })?;
                // Discriminator value of each target: the target type's
                // singular name in upper case (tags → TAG), which must be
                // one of the discriminator field's enum values.
                let allowed = fields[by_field].enumeration.clone().unwrap_or_default();
                let mut map = Vec::new();
                for t in targets {
                    let singular = names[t].trim_end_matches('s').to_uppercase();
                    if !allowed
                        .iter()
                        .any(|a| a.as_deref() == Some(singular.as_str()))
                    {
                        return Err(SchemaError::Invalid(format!(
                            "{name}.{fname}: no {by} value for {}",
                            names[t]
                        )));
                    }
                    map.push((singular, position(t)));
                }
                Reference::ByField {
                    field: by_field as FieldId,
                    targets: map,
                    validated,
                }
            } else {
                Reference::To {
                    ty: position(targets[0]),
                    validated,
                }
            };
            fields[fi].reference = Some(reference);
        }
        let key = rt
            .key
            .iter()
            .map(|k| {
                field_names
                    .iter()
                    .position(|n| n == k)
                    .map(|p| p as FieldId)
                    .ok_or_else(|| SchemaError::Invalid(format!("{name}: key field {k} missing")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut ps: Vec<TypeId> = parents[i].iter().map(|&p| position(p)).collect();
        ps.sort_unstable();
        types.push(TypeDef {
            name: name.clone(),
            aliases: rt.aliases.clone(),
            path: rt.path.clone(),
            batch: rt.batch.unwrap_or(true),
            success_status: rt.success_status.unwrap_or(200),
            key,
            fields,
            parents: ps,
            level: 0,
        });
    }
    for i in 0..types.len() {
        let level = types[i]
            .parents
            .iter()
            .map(|&p| types[p as usize].level + 1)
            .max()
            .unwrap_or(0);
        types[i].level = level;
    }
    let max_level = types.iter().map(|t| t.level).max().unwrap_or(0);
    Ok(Schema {
        types,
        max_level,
        max_records_per_request: raw.request_envelope.max_records_per_request,
    })
}

fn field_def(name: &str, rf: &RawField) -> Result<FieldDef, SchemaError> {
    let ty = match &rf.ty {
        serde_json::Value::String(s) => match s.as_str() {
            "string" => FieldType::String,
            "number" => FieldType::Number,
            "integer" => FieldType::Integer,
            "boolean" => FieldType::Boolean,
            other => {
                return Err(SchemaError::Invalid(format!(
                    "{name}: unknown type {other}"
                )));
            }
        },
        serde_json::Value::Array(a)
            if a.iter().any(|v| v == "integer") && a.iter().any(|v| v == "string") =>
        {
            FieldType::IntegerOrString
        }
        other => {
            return Err(SchemaError::Invalid(format!(
                "{name}: unknown type {other}"
            )))
        }
    };
    let format = match rf.format.as_deref() {
        None => None,
        Some("uuid") => Some(Format::Uuid),
        Some("date-time") => Some(Format::DateTime),
        Some("date") => Some(Format::Date),
        Some("country-code") => Some(Format::CountryCode),
        Some("comma-separated-list") => Some(Format::CommaSeparatedList),
        Some("float") => Some(Format::Float),
        Some("epoch-integer-or-iso-date-time") => Some(Format::EpochIntegerOrIsoDateTime),
        Some(other) => {
            return Err(SchemaError::Invalid(format!(
                "{name}: unknown format {other}"
            )));
        }
    };
    // The schema's notes give geographic ranges as inferred; apply them.
    let range = rf.notes.as_deref().and_then(|n| {
        if n.contains("-90..90") {
            Some((-90.0, 90.0))
        } else if n.contains("-180..180") {
            Some((-180.0, 180.0))
        } else {
            None
        }
    });
    Ok(FieldDef {
        name: name.to_string(),
        ty,
        format,
        required: rf.required,
        nullable: rf.nullable,
        enumeration: rf.enumeration.clone(),
        minimum: rf.minimum,
        exclusive_minimum: rf.exclusive_minimum,
        range,
        reference: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifteen_types_in_a_valid_upload_order() {
        let s = schema();
        assert_eq!(s.types.len(), 15);
        assert_eq!(s.max_records_per_request, 5000);
        for (i, t) in s.types.iter().enumerate() {
            for &p in &t.parents {
                assert!(
                    (p as usize) < i,
                    "{} must come after its parent {}",
                    t.name,
                    s.ty(p).name
                );
                assert!(s.ty(p).level < t.level);
            }
        }
        // The computed order honours the documented one where both agree.
        assert_eq!(
            s.type_names(),
            vec![
                "institutes",
                "courses",
                "categories",
                "tags",
                "keywords",
                "shops",
                "customers",
                "branches",
                "offers",
                "shop-categories",
                "shop-tags",
                "shop-keywords",
                "student-favourites",
                "transactions",
                "user-interactions"
            ]
        );
    }

    #[test]
    fn every_reference_points_to_an_earlier_type() {
        let s = schema();
        let mut validated = 0;
        for (i, t) in s.types.iter().enumerate() {
            for f in &t.fields {
                match &f.reference {
                    Some(Reference::To { ty, validated: v }) => {
                        assert!((*ty as usize) < i, "{}.{}", t.name, f.name);
                        assert!(t.parents.contains(ty), "{}.{} not an edge", t.name, f.name);
                        validated += *v as usize;
                    }
                    Some(Reference::ByField {
                        targets,
                        validated: v,
                        ..
                    }) => {
                        for (_, ty) in targets {
                            assert!((*ty as usize) < i);
                            assert!(t.parents.contains(ty));
                        }
                        validated += *v as usize;
                    }
                    None => {}
                }
            }
        }
        // shop_id ×7, category_id, tag_id, keyword_id, favourites.student_id,
        // interactions.student_id and item_id.
        assert_eq!(validated, 13);
    }

    #[test]
    fn a_cycle_is_rejected() {
        let text = SCHEMA_JSON.replace("\"shops\": []", "\"shops\": [\"branches\"]");
        assert_ne!(text, SCHEMA_JSON, "test must actually alter the graph");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn interactions_facts() {
        let s = schema();
        let id = s.type_id("interactions").unwrap();
        assert_eq!(s.type_id("user-interactions"), Some(id));
        let t = s.ty(id);
        assert_eq!(t.path, "/user-interactions");
        assert!(!t.batch);
        assert_eq!(t.success_status, 201);
        assert!(t.key.is_empty());
        let item = &t.fields[t.field("item_id").unwrap() as usize];
        match &item.reference {
            Some(Reference::ByField { targets, .. }) => {
                let names: Vec<_> = targets.iter().map(|(v, _)| v.as_str()).collect();
                assert_eq!(names, ["TAG", "OFFER", "SHOP", "KEYWORD"]);
            }
            other => panic!("{other:?}"),
        }
        let fav = s.ty(s.type_id("student-favourites").unwrap());
        let nk: Vec<_> = fav
            .natural_key()
            .iter()
            .map(|&f| fav.fields[f as usize].name.clone())
            .collect();
        assert_eq!(nk, ["student_id", "shop_id"]);
        let br = s.ty(s.type_id("branches").unwrap());
        let lat = &br.fields[br.field("latitude").unwrap() as usize];
        assert_eq!(lat.range, Some((-90.0, 90.0)));
        // Field order follows the file.
        assert_eq!(br.fields[0].name, "branch_id");
    }
}
