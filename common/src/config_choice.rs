//! Closed sets of names in `job.toml` (`model.mode`, `train.mixed_precision`, …) as enums.
//!
//! [`config_choice!`](crate::config_choice) declares an enum together with the exact string of
//! each variant, so parsing, serialising (the same strings as the file, so a config's digest does
//! not depend on how it was read), `Display` and the list of allowed values in error messages all
//! come from one table.

use crate::error::{invalid, CommonError};

/// A config value that is one of a fixed set of names.
pub trait ConfigChoice: Copy + PartialEq + 'static {
    /// The dotted config key the choice is read from, for error messages.
    const FIELD: &'static str;
    /// Every choice, in the documented order.
    const ALL: &'static [Self];

    /// The name written in `job.toml`.
    fn name(self) -> &'static str;

    /// The choice called `name`, if any.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|choice| choice.name() == name)
    }

    /// The allowed names for messages: "`a`, `b` or `c`".
    fn allowed() -> String {
        let quoted: Vec<String> = Self::ALL
            .iter()
            .map(|choice| format!("`{}`", choice.name()))
            .collect();
        match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => "nothing".to_string(),
        }
    }

    /// Why `name` is not a choice: "expected `a`, `b` or `c`, got `x`".
    fn refusal(name: &str) -> String {
        format!("expected {}, got `{name}`", Self::allowed())
    }

    /// Parses `name`, refusing others with [`Self::FIELD`] and the allowed names.
    fn parse_choice(name: &str) -> Result<Self, CommonError> {
        Self::from_name(name).ok_or_else(|| invalid(Self::FIELD, Self::refusal(name)))
    }
}

/// Declares a [`ConfigChoice`] enum: `config_choice! { pub enum Name("section.key") { Variant =
/// "name", … } }`. The enum gets `as_str`, `Display`, `FromStr` (errors name the field) and serde
/// as its names; a serde error lists the allowed names (the loader adds the key's path).
#[macro_export]
macro_rules! config_choice {
    (
        $(#[$meta:meta])*
        $visibility:vis enum $name:ident($field:literal) {
            $($(#[$variant_meta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $visibility enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// The name written in `job.toml`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl $crate::config_choice::ConfigChoice for $name {
            const FIELD: &'static str = $field;
            const ALL: &'static [Self] = &[$(Self::$variant,)+];

            fn name(self) -> &'static str {
                self.as_str()
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, formatter: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                formatter.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::CommonError;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                <Self as $crate::config_choice::ConfigChoice>::parse_choice(text)
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                use $crate::config_choice::ConfigChoice;
                let text = <String as ::serde::Deserialize>::deserialize(deserializer)?;
                Self::from_name(&text)
                    .ok_or_else(|| <D::Error as ::serde::de::Error>::custom(Self::refusal(&text)))
            }
        }
    };
}
