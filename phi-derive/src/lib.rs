//! `#[derive(PhiRecord)]` for **phi**. Depend on `phi-types`, which
//! re-exports it (feature `derive`, on by default), rather than on this
//! crate directly; the derive's documentation is on
//! `phi_types::PhiRecord`.

mod expand;
mod model;

use proc_macro::TokenStream;

/// Derives `phi_types::PhiRecord` for a model with plain field types, and
/// generates its sealed twin (`<Model>Sealed`), its changeset
/// (`<Model>Changes`), blind-index lookup helpers and lookup-index finders.
///
/// Container attributes: `#[phi(table = path::to::table)]` (required),
/// `#[phi(crate = path)]`, `#[phi(debug)]`, `#[phi(sealed = Name)]`,
/// `#[phi(changes = Name)]`, `#[phi(sealed_derive(Identifiable, Associations))]`
/// and `#[phi(sealed_attr(diesel(belongs_to(ParentSealed))))]` (more derives
/// and attributes on the sealed struct). Field attributes: `#[phi(owner)]`,
/// `#[phi(encrypt)]`, `#[phi(encrypt, scope = "table.column")]`,
/// `#[phi(encrypt, blind_index = column, normalize = "trim,lowercase")]`,
/// `#[phi(encrypt, lookup_index = column, normalize = "trim,lowercase")]`
/// (an owner-independent index and `find_by_<field>`: equal values are
/// linkable across owners),
/// `#[phi(encrypt, shadow)]` / `#[phi(encrypt, shadow = column)]` (the
/// dual-write phase: the plain value stays in the field's column, the
/// envelope goes to a shadow column, `<column>_encrypted` by default;
/// needs `#[phi(encrypted_flag)]`),
/// `#[phi(row_key)]`, `#[phi(encrypted_flag)]`. `#[diesel(…)]` attributes
/// are forwarded to the generated Diesel structs.
#[proc_macro_derive(PhiRecord, attributes(phi, diesel))]
pub fn derive_phi_record(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::expand(&input).into()
}
