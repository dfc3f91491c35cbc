//! Parsing and checking a model's `#[phi(…)]` attributes.

use darling::util::{Flag, SpannedValue};
use darling::{FromDeriveInput, FromField, FromMeta};
use proc_macro2::Span;

#[derive(FromDeriveInput)]
#[darling(attributes(phi), supports(struct_named), forward_attrs(diesel))]
struct RawModel {
    ident: syn::Ident,
    vis: syn::Visibility,
    generics: syn::Generics,
    data: darling::ast::Data<darling::util::Ignored, RawField>,
    attrs: Vec<syn::Attribute>,
    table: Option<syn::Path>,
    #[darling(rename = "crate")]
    krate: Option<syn::Path>,
    debug: Flag,
    sealed: Option<syn::Ident>,
    changes: Option<syn::Ident>,
    #[darling(multiple)]
    sealed_derive: Vec<darling::util::PathList>,
    #[darling(multiple)]
    sealed_attr: Vec<MetaItems>,
    /// `compound_index(column = …, fields(a, b), bits = …)`.
    #[darling(multiple)]
    compound_index: Vec<SpannedValue<RawCompound>>,
}

/// One `compound_index(…)` of the model.
#[derive(FromMeta)]
struct RawCompound {
    column: syn::Ident,
    fields: darling::util::PathList,
    bits: Option<u16>,
}

/// The attributes of `sealed_attr(…)`, each written as it would be inside
/// `#[…]`.
struct MetaItems(Vec<syn::Meta>);

impl darling::FromMeta for MetaItems {
    fn from_list(items: &[darling::ast::NestedMeta]) -> darling::Result<Self> {
        let mut metas = Vec::new();
        let mut errors = darling::Error::accumulator();
        for item in items {
            match item {
                darling::ast::NestedMeta::Meta(meta) => metas.push(meta.clone()),
                darling::ast::NestedMeta::Lit(lit) => errors.push(
                    darling::Error::custom(
                        "`sealed_attr` takes attributes, as in `sealed_attr(diesel(belongs_to(Parent)))`",
                    )
                    .with_span(lit),
                ),
            }
        }
        errors.finish_with(MetaItems(metas))
    }
}

/// What the sealed struct derives itself: a `sealed_derive` naming one of
/// these would derive it twice.
const SEALED_DERIVES: [&str; 4] = ["Queryable", "Selectable", "Insertable", "AsChangeset"];

#[derive(FromField)]
#[darling(attributes(phi), forward_attrs(diesel))]
struct RawField {
    ident: Option<syn::Ident>,
    vis: syn::Visibility,
    ty: syn::Type,
    attrs: Vec<syn::Attribute>,
    owner: Flag,
    encrypt: Flag,
    row_key: Flag,
    encrypted_flag: Flag,
    scope: Option<SpannedValue<String>>,
    blind_index: Option<syn::Ident>,
    lookup_index: Option<syn::Ident>,
    normalize: Option<SpannedValue<String>>,
    shadow: Option<SpannedValue<darling::util::Override<syn::Ident>>>,
    /// `index(column = …, prefix = 3, bits = 16, …)`: derived indexes.
    #[darling(multiple, rename = "index")]
    indexes: Vec<SpannedValue<RawIndex>>,
}

/// One `index(…)` of a field.
#[derive(FromMeta)]
struct RawIndex {
    column: syn::Ident,
    prefix: Option<u16>,
    last_digits: Option<u16>,
    year: Flag,
    year_month: Flag,
    bits: Option<u16>,
    normalize: Option<String>,
}

/// A checked model.
pub(crate) struct Model {
    pub(crate) ident: syn::Ident,
    pub(crate) vis: syn::Visibility,
    pub(crate) diesel_attrs: Vec<syn::Attribute>,
    pub(crate) table: syn::Path,
    /// Whether the model's own `#[diesel(…)]` attributes name the table
    /// (forwarded to the generated structs, which then get no second one).
    pub(crate) diesel_table_name: bool,
    /// The table's SQL name (the path's last segment).
    pub(crate) table_name: String,
    pub(crate) krate: syn::Path,
    pub(crate) debug: bool,
    pub(crate) sealed: syn::Ident,
    pub(crate) changes: syn::Ident,
    /// `sealed_derive(…)`: more derives on the sealed struct.
    pub(crate) sealed_derives: Vec<syn::Path>,
    /// `sealed_attr(…)`: more attributes on the sealed struct.
    pub(crate) sealed_attrs: Vec<syn::Meta>,
    pub(crate) fields: Vec<Field>,
    /// `compound_index(…)`: tags of several encrypted fields together.
    pub(crate) compounds: Vec<Compound>,
}

/// A compound index (`#[phi(compound_index(column = …, fields(a, b)))]`):
/// its column, the encrypted fields (indexes into `Model::fields`), in
/// order, and its tag length.
pub(crate) struct Compound {
    pub(crate) column: syn::Ident,
    pub(crate) fields: Vec<usize>,
    pub(crate) bits: u16,
}

/// What a field is.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Role {
    Plain,
    Owner,
    RowKey,
    Flag,
    Encrypt {
        scope: String,
        blind_index: Option<BlindIndex>,
        /// The owner-independent lookup index column, and its
        /// normalisation (the same as the blind index's).
        lookup_index: Option<BlindIndex>,
        /// The derived indexes (`index(…)`).
        derived: Vec<Derived>,
        /// The field's `normalize` (trim, lowercase): a compound index's
        /// normalisation of it.
        normalize: (bool, bool),
        /// The shadow column of the dual-write phase
        /// (`#[phi(encrypt, shadow)]`): sealed values go there, the
        /// field's own column keeps the plain value.
        shadow: Option<syn::Ident>,
    },
}

#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BlindIndex {
    pub(crate) column: syn::Ident,
    pub(crate) trim: bool,
    pub(crate) lowercase: bool,
}

/// A derived index (`#[phi(encrypt, index(column = …, …))]`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Derived {
    pub(crate) column: syn::Ident,
    pub(crate) transform: DerivedTransform,
    pub(crate) trim: bool,
    pub(crate) lowercase: bool,
    pub(crate) bits: u16,
}

/// What a derived index keeps of the value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum DerivedTransform {
    Whole,
    Prefix(u16),
    LastDigits(u16),
    Year,
    YearMonth,
}

pub(crate) struct Field {
    pub(crate) ident: syn::Ident,
    /// The SQL column (`#[diesel(column_name = …)]`, else the field's name).
    pub(crate) column: String,
    /// The same, as the Diesel column's identifier in the table module.
    pub(crate) column_ident: syn::Ident,
    pub(crate) vis: syn::Visibility,
    pub(crate) ty: syn::Type,
    /// `T` of an `Option<T>` field.
    pub(crate) option_of: Option<syn::Type>,
    pub(crate) diesel_attrs: Vec<syn::Attribute>,
    pub(crate) role: Role,
}

impl Field {
    /// The value type sealed: `T` for `T` and `Option<T>`.
    pub(crate) fn value_ty(&self) -> &syn::Type {
        self.option_of.as_ref().unwrap_or(&self.ty)
    }
}

impl Model {
    pub(crate) fn parse(input: &syn::DeriveInput) -> darling::Result<Model> {
        let raw = RawModel::from_derive_input(input)?;
        let mut errors = darling::Error::accumulator();

        if !raw.generics.params.is_empty() {
            errors.push(
                darling::Error::custom("`#[derive(PhiRecord)]` does not support generic models")
                    .with_span(&raw.generics),
            );
        }
        let diesel_table = diesel_table_name(&raw.attrs);
        let table = match (raw.table, &diesel_table) {
            (Some(table), Some(diesel)) => {
                let (a, b) = (path_text(&table), path_text(diesel));
                if a != b {
                    errors.push(
                        darling::Error::custom(format!(
                            "`#[phi(table = {a})]` and `#[diesel(table_name = {b})]` name different tables: keep one (`#[diesel(table_name = …)]` is enough), or make them agree"
                        ))
                        .with_span(&table),
                    );
                }
                table
            }
            (Some(table), None) => table,
            (None, Some(diesel)) => diesel.clone(),
            (None, None) => {
                errors.push(
                    darling::Error::custom(
                        "missing table: name the Diesel table this model is stored in with `#[diesel(table_name = …)]` or `#[phi(table = …)]`, e.g. `#[diesel(table_name = cases)]`",
                    )
                    .with_span(&raw.ident),
                );
                syn::parse_quote!(unknown_table)
            }
        };
        let table_name = table
            .segments
            .last()
            .map(|s| unraw(&s.ident))
            .unwrap_or_default();

        let raw_fields = raw.data.take_struct().map(|f| f.fields).unwrap_or_default();
        // The fields compound indexes name: their `normalize` applies there.
        let raw_compound_fields: Vec<syn::Ident> = raw
            .compound_index
            .iter()
            .flat_map(|c| c.fields.iter().filter_map(|p| p.get_ident().cloned()))
            .collect();
        let mut fields = Vec::new();
        let mut owner: Option<Span> = None;
        let mut row_key: Option<Span> = None;
        let mut flag: Option<Span> = None;
        let mut raw_shadow_spans: Vec<Span> = Vec::new();
        for f in raw_fields {
            let Some(ident) = f.ident.clone() else {
                continue;
            };
            if let (true, Some(shadow)) = (f.encrypt.is_present(), &f.shadow) {
                raw_shadow_spans.push(shadow.span());
            }
            let column_ident = column_name(&f.attrs).unwrap_or_else(|| ident.clone());
            let column = unraw(&column_ident);
            let marks = [
                ("owner", &f.owner),
                ("row_key", &f.row_key),
                ("encrypted_flag", &f.encrypted_flag),
            ];
            if f.encrypt.is_present() {
                for (name, mark) in marks {
                    if mark.is_present() {
                        errors.push(
                            darling::Error::custom(format!(
                                "a field cannot be both `{name}` and `encrypt`: {}",
                                match name {
                                    "owner" => "the owner selects the data key, so it must stay plaintext",
                                    "row_key" => "the row key is bound into every sealed value of the row, so it must stay plaintext",
                                    _ => "the encrypted flag says whether the row is sealed, so it must stay plaintext",
                                }
                            ))
                            .with_span(&mark.span()),
                        );
                    }
                }
            } else {
                let present: Vec<_> = marks.iter().filter(|(_, m)| m.is_present()).collect();
                if present.len() > 1 {
                    errors.push(
                        darling::Error::custom(format!(
                            "a field cannot be both `{}` and `{}`",
                            present[0].0, present[1].0
                        ))
                        .with_span(&present[1].1.span()),
                    );
                }
                for (what, value_span) in [
                    ("scope", f.scope.as_ref().map(|s| s.span())),
                    ("blind_index", f.blind_index.as_ref().map(|b| b.span())),
                    ("lookup_index", f.lookup_index.as_ref().map(|b| b.span())),
                    ("normalize", f.normalize.as_ref().map(|s| s.span())),
                    ("shadow", f.shadow.as_ref().map(|s| s.span())),
                    ("index", f.indexes.first().map(|i| i.span())),
                ] {
                    if let Some(span) = value_span {
                        let example = if what == "index" {
                            "index(column = …, prefix = 3)".to_owned()
                        } else {
                            format!("{what} = …")
                        };
                        errors.push(
                            darling::Error::custom(format!(
                                "`{what}` applies only to an encrypted field: add `encrypt`, as in `#[phi(encrypt, {example})]`"
                            ))
                            .with_span(&span),
                        );
                    }
                }
            }
            let mut once = |seen: &mut Option<Span>, mark: &Flag, what: &str| {
                if mark.is_present() {
                    if seen.is_some() {
                        errors.push(
                            darling::Error::custom(format!(
                                "only one field can be `#[phi({what})]`"
                            ))
                            .with_span(&mark.span()),
                        );
                    } else {
                        *seen = Some(mark.span());
                    }
                }
            };
            once(&mut owner, &f.owner, "owner");
            once(&mut row_key, &f.row_key, "row_key");
            once(&mut flag, &f.encrypted_flag, "encrypted_flag");

            let role = if f.encrypt.is_present() {
                let normalize = match &f.normalize {
                    None => (false, false),
                    Some(text) => match parse_normalize(text) {
                        Ok(n) => {
                            if f.blind_index.is_none()
                                && f.lookup_index.is_none()
                                && f.indexes.is_empty()
                                && !raw_compound_fields.contains(&ident)
                            {
                                errors.push(
                                    darling::Error::custom(
                                        "`normalize` applies to the blind, lookup or derived indexes: add `blind_index = column`, `lookup_index = column` or `index(column = …)`",
                                    )
                                    .with_span(&text.span()),
                                );
                            }
                            n
                        }
                        Err(e) => {
                            errors.push(e.with_span(&text.span()));
                            (false, false)
                        }
                    },
                };
                Role::Encrypt {
                    normalize,
                    scope: match &f.scope {
                        Some(scope) if scope.is_empty() => {
                            errors.push(
                                darling::Error::custom("`scope` must not be empty")
                                    .with_span(&scope.span()),
                            );
                            String::new()
                        }
                        Some(scope) => (**scope).clone(),
                        None => format!("{table_name}.{column}"),
                    },
                    blind_index: f.blind_index.clone().map(|column| BlindIndex {
                        column,
                        trim: normalize.0,
                        lowercase: normalize.1,
                    }),
                    lookup_index: f.lookup_index.clone().map(|column| BlindIndex {
                        column,
                        trim: normalize.0,
                        lowercase: normalize.1,
                    }),
                    derived: f
                        .indexes
                        .iter()
                        .filter_map(|raw| match derived(raw, normalize) {
                            Ok(d) => Some(d),
                            Err(e) => {
                                errors.push(e.with_span(&raw.span()));
                                None
                            }
                        })
                        .collect(),
                    shadow: f.shadow.as_ref().map(|s| match &**s {
                        darling::util::Override::Explicit(ident) => ident.clone(),
                        darling::util::Override::Inherit => {
                            quote::format_ident!("{}_encrypted", column)
                        }
                    }),
                }
            } else if f.owner.is_present() {
                Role::Owner
            } else if f.row_key.is_present() {
                Role::RowKey
            } else if f.encrypted_flag.is_present() {
                Role::Flag
            } else {
                Role::Plain
            };
            fields.push(Field {
                option_of: option_inner(&f.ty),
                column,
                column_ident,
                ident,
                vis: f.vis,
                ty: f.ty,
                diesel_attrs: f.attrs,
                role,
            });
        }
        if owner.is_none() {
            errors.push(
                darling::Error::custom(
                    "`#[derive(PhiRecord)]` needs one `#[phi(owner)]` field: the owner whose data key seals the row",
                )
                .with_span(&raw.ident),
            );
        }
        if flag.is_none() {
            for f in &raw_shadow_spans {
                errors.push(
                    darling::Error::custom(
                        "`shadow` needs an `#[phi(encrypted_flag)]` field: the flag says whether a row's value is read from the shadow column or from the plaintext column",
                    )
                    .with_span(f),
                );
            }
        }
        let mut errors = errors.checkpoint()?;
        if owner.is_some()
            && !fields
                .iter()
                .any(|f| matches!(f.role, Role::Encrypt { .. }))
        {
            errors.push(
                darling::Error::custom(
                    "no field is `#[phi(encrypt)]`: mark the fields holding PHI",
                )
                .with_span(&raw.ident),
            );
        }
        for f in &fields {
            if matches!(f.role, Role::Owner | Role::RowKey | Role::Flag) && f.option_of.is_some() {
                errors.push(
                    darling::Error::custom("the owner, row key and encrypted flag cannot be `Option`: every row needs one")
                        .with_span(&f.ty),
                );
            }
        }
        let sealed_derives: Vec<syn::Path> = raw
            .sealed_derive
            .iter()
            .flat_map(|list| list.iter().cloned())
            .collect();
        for path in &sealed_derives {
            let name = path
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .unwrap_or_default();
            if SEALED_DERIVES.contains(&name.as_str()) {
                errors.push(
                    darling::Error::custom(format!(
                        "the sealed struct already derives `{name}`: `sealed_derive` adds other derives, such as `Identifiable` or `Associations`"
                    ))
                    .with_span(path),
                );
            } else if name == "Debug" {
                errors.push(
                    darling::Error::custom(
                        "a `Debug` of the sealed struct comes from `#[phi(debug)]`, which redacts the model's encrypted fields",
                    )
                    .with_span(path),
                );
            }
        }
        let sealed_attrs: Vec<syn::Meta> = raw
            .sealed_attr
            .into_iter()
            .flat_map(|items| items.0)
            .collect();
        for meta in &sealed_attrs {
            if meta.path().is_ident("derive") {
                errors.push(
                    darling::Error::custom(
                        "derives on the sealed struct go in `sealed_derive(…)`, as in `#[phi(sealed_derive(Identifiable))]`",
                    )
                    .with_span(meta),
                );
            } else if meta.path().is_ident("phi") {
                errors.push(
                    darling::Error::custom(
                        "`sealed_attr` attributes go on the generated sealed struct, which has no `#[phi(…)]` attributes",
                    )
                    .with_span(meta),
                );
            }
        }
        for f in &fields {
            let Role::Encrypt { derived, .. } = &f.role else {
                continue;
            };
            let text = is_string(f.value_ty());
            for d in derived {
                if matches!(
                    d.transform,
                    DerivedTransform::Prefix(_) | DerivedTransform::LastDigits(_)
                ) && !text
                {
                    errors.push(
                        darling::Error::custom(
                            "`prefix` and `last_digits` index text: the field must be a `String` (or `Option<String>`); an integer's encoding is binary, so its digits cannot be searched",
                        )
                        .with_span(&d.column),
                    );
                }
            }
        }
        let mut compounds = Vec::new();
        for raw_compound in &raw.compound_index {
            let mut parts = Vec::new();
            for path in raw_compound.fields.iter() {
                let found = path.get_ident().and_then(|name| {
                    fields
                        .iter()
                        .position(|f| &f.ident == name && matches!(f.role, Role::Encrypt { .. }))
                });
                if let Some(Role::Encrypt { scope, .. }) = found.map(|i| &fields[i].role)
                    && scope.contains('+')
                {
                    errors.push(
                        darling::Error::custom(
                            "a compound index joins its fields' scopes with `+`: a field in one needs a scope without `+`",
                        )
                        .with_span(path),
                    );
                }
                match found {
                    Some(i) if parts.contains(&i) => errors.push(
                        darling::Error::custom("a compound index names each field once")
                            .with_span(path),
                    ),
                    Some(i) => parts.push(i),
                    None => errors.push(
                        darling::Error::custom(
                            "a compound index is over encrypted fields of the model: name each by its field, as in `fields(patient_last, patient_dob)`",
                        )
                        .with_span(path),
                    ),
                }
            }
            if parts.len() < 2 && raw_compound.fields.len() < 2 {
                errors.push(
                    darling::Error::custom(
                        "a compound index is over two fields or more (one field: `index(column = …)` on it)",
                    )
                    .with_span(&raw_compound.span()),
                );
            }
            let bits = raw_compound.bits.unwrap_or(128);
            if !(1..=128).contains(&bits) {
                errors.push(
                    darling::Error::custom(format!(
                        "`bits = {bits}`: a compound index's tag is 1 to 128 bits"
                    ))
                    .with_span(&raw_compound.span()),
                );
            }
            compounds.push(Compound {
                column: raw_compound.column.clone(),
                fields: parts,
                bits,
            });
        }
        errors.finish()?;

        let ident = raw.ident;
        Ok(Model {
            compounds,
            sealed: raw
                .sealed
                .unwrap_or_else(|| quote::format_ident!("{}Sealed", ident)),
            changes: raw
                .changes
                .unwrap_or_else(|| quote::format_ident!("{}Changes", ident)),
            sealed_derives,
            sealed_attrs,
            ident,
            vis: raw.vis,
            diesel_attrs: raw.attrs,
            table,
            diesel_table_name: diesel_table.is_some(),
            table_name,
            krate: raw.krate.unwrap_or_else(|| syn::parse_quote!(::phi_types)),
            debug: raw.debug.is_present(),
            fields,
        })
    }
}

/// A checked `index(…)`: one transformation at most (none: the whole
/// value), a tag of 1 to 128 bits, the field's normalisation unless the
/// index names its own.
fn derived(raw: &RawIndex, field_normalize: (bool, bool)) -> darling::Result<Derived> {
    let mut chosen = Vec::new();
    if let Some(n) = raw.prefix {
        chosen.push(("prefix", DerivedTransform::Prefix(n), Some(n)));
    }
    if let Some(n) = raw.last_digits {
        chosen.push(("last_digits", DerivedTransform::LastDigits(n), Some(n)));
    }
    if raw.year.is_present() {
        chosen.push(("year", DerivedTransform::Year, None));
    }
    if raw.year_month.is_present() {
        chosen.push(("year_month", DerivedTransform::YearMonth, None));
    }
    let transform = match chosen.as_slice() {
        [] => DerivedTransform::Whole,
        [(name, transform, n)] => {
            if *n == Some(0) {
                return Err(darling::Error::custom(format!(
                    "`{name} = 0` keeps nothing of the value: use 1 or more"
                )));
            }
            *transform
        }
        [(a, ..), (b, ..), ..] => {
            return Err(darling::Error::custom(format!(
                "an index keeps one part of the value: `{a}` and `{b}` both given (declare two indexes)"
            )));
        }
    };
    let bits = raw.bits.unwrap_or(128);
    if !(1..=128).contains(&bits) {
        return Err(darling::Error::custom(format!(
            "`bits = {bits}`: a derived index's tag is 1 to 128 bits (16 to 32 for a coarse bucket)"
        )));
    }
    let (trim, lowercase) = match &raw.normalize {
        Some(text) => parse_normalize(text)?,
        None => field_normalize,
    };
    Ok(Derived {
        column: raw.column.clone(),
        transform,
        trim,
        lowercase,
        bits,
    })
}

/// Whether `ty` is written `String` (or `std::string::String`).
fn is_string(ty: &syn::Type) -> bool {
    let syn::Type::Path(path) = ty else {
        return false;
    };
    path.qself.is_none()
        && path.path.segments.last().is_some_and(|last| {
            last.ident == "String" && matches!(last.arguments, syn::PathArguments::None)
        })
}

fn parse_normalize(text: &str) -> darling::Result<(bool, bool)> {
    let mut out = (false, false);
    for part in text.split(',').map(str::trim) {
        match part {
            "trim" => out.0 = true,
            "lowercase" => out.1 = true,
            "none" => {}
            other => {
                return Err(darling::Error::custom(format!(
                    "unknown normaliser `{other}`: use \"trim\", \"lowercase\" or \"trim,lowercase\""
                )));
            }
        }
    }
    Ok(out)
}

/// `#[diesel(table_name = path)]` on the model.
fn diesel_table_name(attrs: &[syn::Attribute]) -> Option<syn::Path> {
    diesel_value(attrs, "table_name")
}

/// The value of `key` in the `#[diesel(…)]` attributes `attrs`, the last
/// one written; other keys and their values are skipped.
fn diesel_value<T: syn::parse::Parse>(attrs: &[syn::Attribute], key: &str) -> Option<T> {
    let mut found = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("diesel")) {
        let _ = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident(key) {
                found = Some(meta.value()?.parse()?);
            } else if meta.input.peek(syn::Token![=]) {
                let _: syn::Expr = meta.value()?.parse()?;
            } else if meta.input.peek(syn::token::Paren) {
                let _content;
                syn::parenthesized!(_content in meta.input);
            }
            Ok(())
        });
    }
    found
}

/// A path as written, without spaces (`schema::cases`).
fn path_text(path: &syn::Path) -> String {
    quote::quote!(#path).to_string().replace(' ', "")
}

/// `#[diesel(column_name = x)]` on a field.
fn column_name(attrs: &[syn::Attribute]) -> Option<syn::Ident> {
    diesel_value(attrs, "column_name")
}

fn unraw(ident: &syn::Ident) -> String {
    let s = ident.to_string();
    s.strip_prefix("r#").map(str::to_owned).unwrap_or(s)
}

/// `T` when `ty` is written `Option<T>`.
fn option_inner(ty: &syn::Type) -> Option<syn::Type> {
    let syn::Type::Path(path) = ty else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first() {
        Some(syn::GenericArgument::Type(inner)) if args.args.len() == 1 => Some(inner.clone()),
        _ => None,
    }
}
