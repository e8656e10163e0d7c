//! Typed, checked access to a node's attributes.
//!
//! ONNX tags each attribute with its type (`AttributeProto.type`); models
//! older than IR version 2 may omit the tag, in which case the field that is
//! set decides. A present attribute of the wrong type is an error, never a
//! silent default.

use crate::Error;
use crate::proto::{AttributeProto, AttributeType, TensorProto};

/// The attributes of one node, with the node's identity for error messages.
pub(crate) struct Attributes<'a> {
    op: &'a str,
    node: &'a str,
    list: &'a [AttributeProto],
}

impl<'a> Attributes<'a> {
    /// Wraps a node's attribute list. Attributes that refer to a function's
    /// parameters (`ref_attr_name`) cannot occur in a main graph.
    pub(crate) fn new(
        op: &'a str,
        node: &'a str,
        list: &'a [AttributeProto],
    ) -> Result<Attributes<'a>, Error> {
        if let Some(a) = list.iter().find(|a| a.ref_attr_name.is_some()) {
            return Err(Error::invalid(format!(
                "node '{node}' ({op}): attribute '{}' refers to a function parameter \
                 outside a function",
                a.name.as_deref().unwrap_or("")
            )));
        }
        Ok(Attributes { op, node, list })
    }

    /// True when the attribute is present.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// An `INT` attribute, or `default` when absent.
    pub(crate) fn int(&self, name: &str, default: i64) -> Result<i64, Error> {
        match self.typed(name, AttributeType::Int, |a| a.i.is_some())? {
            Some(a) => Ok(a.i.unwrap_or(0)),
            None => Ok(default),
        }
    }

    /// An `INT` attribute that must be 0 or 1.
    pub(crate) fn flag(&self, name: &str, default: bool) -> Result<bool, Error> {
        match self.int(name, i64::from(default))? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(name, format!("must be 0 or 1, got {v}"))),
        }
    }

    /// A `FLOAT` attribute, or `default` when absent.
    pub(crate) fn float(&self, name: &str, default: f32) -> Result<f32, Error> {
        match self.typed(name, AttributeType::Float, |a| a.f.is_some())? {
            Some(a) => Ok(a.f.unwrap_or(0.0)),
            None => Ok(default),
        }
    }

    /// An `INTS` attribute, or `None` when absent.
    pub(crate) fn ints(&self, name: &str) -> Result<Option<&'a [i64]>, Error> {
        Ok(self
            .typed(name, AttributeType::Ints, |a| !a.ints.is_empty())?
            .map(|a| a.ints.as_slice()))
    }

    /// A `FLOATS` attribute, or `None` when absent.
    pub(crate) fn floats(&self, name: &str) -> Result<Option<&'a [f32]>, Error> {
        Ok(self
            .typed(name, AttributeType::Floats, |a| !a.floats.is_empty())?
            .map(|a| a.floats.as_slice()))
    }

    /// A `STRING` attribute decoded as UTF-8, or `default` when absent.
    pub(crate) fn string(&self, name: &str, default: &str) -> Result<String, Error> {
        match self.typed(name, AttributeType::String, |a| a.s.is_some())? {
            Some(a) => String::from_utf8(a.s.clone().unwrap_or_default())
                .map_err(|_| self.invalid(name, "is not valid UTF-8".into())),
            None => Ok(default.to_string()),
        }
    }

    /// A `TENSOR` attribute, or `None` when absent.
    pub(crate) fn tensor(&self, name: &str) -> Result<Option<&'a TensorProto>, Error> {
        Ok(self
            .typed(name, AttributeType::Tensor, |a| a.t.is_some())?
            .and_then(|a| a.t.as_ref()))
    }

    /// The names of all attributes present, for "which form is this" checks.
    pub(crate) fn names(&self) -> impl Iterator<Item = &'a str> {
        self.list.iter().map(|a| a.name.as_deref().unwrap_or(""))
    }

    /// An [`Error::InvalidModel`] about attribute `name`.
    pub(crate) fn invalid(&self, name: &str, what: String) -> Error {
        Error::invalid(format!(
            "node '{}' ({}): attribute '{name}' {what}",
            self.node, self.op
        ))
    }

    fn find(&self, name: &str) -> Option<&'a AttributeProto> {
        self.list.iter().find(|a| a.name.as_deref() == Some(name))
    }

    /// The attribute `name` when present, checked to be of type `want`.
    /// Untagged attributes are accepted when `is_set` says the matching field is set.
    fn typed(
        &self,
        name: &str,
        want: AttributeType,
        is_set: fn(&AttributeProto) -> bool,
    ) -> Result<Option<&'a AttributeProto>, Error> {
        let Some(a) = self.find(name) else {
            return Ok(None);
        };
        let tag = a.r#type.unwrap_or(0);
        let ok = if tag == AttributeType::Undefined as i32 {
            is_set(a)
        } else {
            tag == want as i32
        };
        if !ok {
            let got = AttributeType::try_from(tag)
                .map(|t| format!("{t:?}").to_uppercase())
                .unwrap_or_else(|_| format!("type {tag}"));
            return Err(self.invalid(
                name,
                format!(
                    "has type {got}, expected {}",
                    format!("{want:?}").to_uppercase()
                ),
            ));
        }
        Ok(Some(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_attr(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(v),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_types_and_untagged_attributes() {
        let mut untagged = int_attr("group", 2);
        untagged.r#type = None;
        let list = vec![int_attr("axis", -1), untagged];
        let attrs = Attributes::new("Conv", "c", &list).unwrap();
        assert_eq!(attrs.int("axis", 1).unwrap(), -1);
        assert_eq!(attrs.int("group", 1).unwrap(), 2);
        assert_eq!(attrs.int("missing", 7).unwrap(), 7);
        assert!(attrs.has("axis"));
        let err = attrs.float("axis", 0.0).unwrap_err();
        assert!(
            err.to_string().contains("has type INT, expected FLOAT"),
            "{err}"
        );
        assert!(attrs.flag("axis", false).is_err());
    }
}
