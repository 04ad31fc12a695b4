//! The value model: the Python objects a `.pt` file can hold.

use super::tensor::PtTensor;
use super::tensor_ref::TensorRef;

/// A Python value as stored in a `.pt` file, generic over what a tensor is:
/// a materialised [`PtTensor`] ([`PtValue`]) or a reference into the
/// archive's storages ([`PtSkeleton`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PtTree<T> {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<PtTree<T>>),
    Tuple(Vec<PtTree<T>>),
    /// A `dict` (or `OrderedDict`) with string keys, in insertion order.
    Dict(Vec<(String, PtTree<T>)>),
    Tensor(T),
}

/// Deepest nesting of lists, tuples and dicts the reader and writer accept.
pub(super) const MAX_DEPTH: usize = 128;

/// A value whose tensors hold their data.
pub type PtValue = PtTree<PtTensor>;

/// A value whose tensors point at storages in the archive.
pub type PtSkeleton = PtTree<TensorRef>;

impl<T> PtTree<T> {
    /// The value under `key` if `self` is a dict holding it.
    pub fn get(&self, key: &str) -> Option<&PtTree<T>> {
        self.as_dict()?
            .iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// The entries if `self` is a dict.
    pub fn as_dict(&self) -> Option<&[(String, PtTree<T>)]> {
        match self {
            PtTree::Dict(entries) => Some(entries),
            _ => None,
        }
    }

    /// The items if `self` is a list or a tuple.
    pub fn as_list(&self) -> Option<&[PtTree<T>]> {
        match self {
            PtTree::List(items) | PtTree::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The tensor if `self` is one.
    pub fn as_tensor(&self) -> Option<&T> {
        match self {
            PtTree::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The string if `self` is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PtTree::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer if `self` is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            PtTree::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The float if `self` is one.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            PtTree::Float(x) => Some(*x),
            _ => None,
        }
    }

    /// The Python type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            PtTree::None => "None",
            PtTree::Bool(_) => "bool",
            PtTree::Int(_) => "int",
            PtTree::Float(_) => "float",
            PtTree::Str(_) => "str",
            PtTree::List(_) => "list",
            PtTree::Tuple(_) => "tuple",
            PtTree::Dict(_) => "dict",
            PtTree::Tensor(_) => "Tensor",
        }
    }

    /// Rebuilds the tree with every tensor passed through `f`, in document order.
    pub fn try_map<U, E>(self, f: &mut impl FnMut(T) -> Result<U, E>) -> Result<PtTree<U>, E> {
        Ok(match self {
            PtTree::None => PtTree::None,
            PtTree::Bool(b) => PtTree::Bool(b),
            PtTree::Int(i) => PtTree::Int(i),
            PtTree::Float(x) => PtTree::Float(x),
            PtTree::Str(s) => PtTree::Str(s),
            PtTree::List(items) => PtTree::List(try_map_all(items, f)?),
            PtTree::Tuple(items) => PtTree::Tuple(try_map_all(items, f)?),
            PtTree::Dict(entries) => PtTree::Dict(
                entries
                    .into_iter()
                    .map(|(k, v)| Ok((k, v.try_map(f)?)))
                    .collect::<Result<Vec<_>, E>>()?,
            ),
            PtTree::Tensor(t) => PtTree::Tensor(f(t)?),
        })
    }
}

fn try_map_all<T, U, E>(
    items: Vec<PtTree<T>>,
    f: &mut impl FnMut(T) -> Result<U, E>,
) -> Result<Vec<PtTree<U>>, E> {
    items.into_iter().map(|item| item.try_map(f)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors() {
        let v: PtTree<()> = PtTree::Dict(vec![
            ("a".into(), PtTree::Int(3)),
            ("b".into(), PtTree::List(vec![PtTree::Str("x".into())])),
            ("c".into(), PtTree::Tensor(())),
        ]);
        assert_eq!(v.get("a").and_then(PtTree::as_int), Some(3));
        let b = v.get("b").and_then(PtTree::as_list).unwrap();
        assert_eq!(b[0].as_str(), Some("x"));
        assert!(v.get("c").unwrap().as_tensor().is_some());
        assert!(v.get("zz").is_none());
        assert!(PtTree::<()>::Int(1).get("a").is_none());
    }

    #[test]
    fn try_map_visits_tensors_in_order() {
        let v: PtTree<u32> = PtTree::Tuple(vec![
            PtTree::Tensor(1),
            PtTree::Dict(vec![("k".into(), PtTree::Tensor(2))]),
        ]);
        let mut seen = Vec::new();
        let mapped = v
            .try_map(&mut |t| {
                seen.push(t);
                Ok::<_, ()>(t * 10)
            })
            .unwrap();
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(mapped.get("k"), None);
        assert_eq!(
            mapped.as_list().unwrap()[1].get("k"),
            Some(&PtTree::Tensor(20))
        );
    }
}
