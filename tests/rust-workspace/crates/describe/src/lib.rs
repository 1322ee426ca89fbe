//! `#[derive(Describe)]`: a `describe()` that names a struct and its fields.
use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Fields};

#[proc_macro_derive(Describe)]
pub fn derive_describe(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    let name = &input.ident;
    let fields: Vec<String> = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) => named
                .named
                .iter()
                .filter_map(|field| field.ident.as_ref().map(|ident| ident.to_string()))
                .collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let text = format!("{} {{ {} }}", name, fields.join(", "));
    let expanded = quote! {
        impl #name {
            pub fn describe() -> &'static str { #text }
        }
    };
    expanded.into()
}
