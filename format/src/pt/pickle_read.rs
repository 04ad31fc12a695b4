//! A small, safe unpickler for `data.pkl`.
//!
//! Supports the opcodes `torch.save` emits (protocol 2, and the protocol 4
//! framing, memo and string opcodes) and only the globals torch pickles
//! tensors with: `torch._utils._rebuild_tensor_v2`, `collections.OrderedDict`
//! and the `torch.*Storage` classes of [`PtDtype`]. Objects live in an arena
//! so that memo references share lists and dicts as Python does; the result
//! is then unfolded into a [`PtSkeleton`] under depth and size limits.
//! Every read is bounds-checked: malformed input gives an error, never a panic.

use std::collections::HashMap;

use super::PtError;
use super::opcodes::*;
use super::tensor::PtDtype;
use super::tensor_ref::TensorRef;
use super::value::{MAX_DEPTH, PtSkeleton, PtTree};

/// Unpickles `data` into a tree whose tensors reference storages.
pub(super) fn unpickle(data: &[u8]) -> Result<PtSkeleton, PtError> {
    let mut machine = Machine {
        data,
        pos: 0,
        op_start: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = machine.run()?;
    // Shared references can make the tree larger than the pickle; bound it.
    let mut budget = machine
        .nodes
        .len()
        .saturating_mul(16)
        .saturating_add(1 << 20);
    machine.unfold(root, 0, &mut budget)
}

/// Longest GLOBAL operand line accepted.
const MAX_LINE: usize = 256;

/// Index of an object in the arena.
type Id = usize;

/// A Python object under construction.
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    /// `dict` or `OrderedDict`; duplicate keys are resolved when unfolding.
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage {
        dtype: PtDtype,
        key: String,
        numel: u64,
    },
    Tensor(TensorRef),
}

/// The allowed globals.
#[derive(Clone, Copy)]
enum Global {
    RebuildTensorV2,
    OrderedDict,
    Storage(PtDtype),
}

impl Node {
    fn type_name(&self) -> &'static str {
        match self {
            Node::None => "None",
            Node::Bool(_) => "bool",
            Node::Int(_) => "int",
            Node::Float(_) => "float",
            Node::Str(_) => "str",
            Node::List(_) => "list",
            Node::Tuple(_) => "tuple",
            Node::Dict(_) => "dict",
            Node::Global(_) => "global",
            Node::Storage { .. } => "storage",
            Node::Tensor(_) => "Tensor",
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_start: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

impl<'a> Machine<'a> {
    fn fail(&self, message: impl Into<String>) -> PtError {
        PtError::Pickle {
            offset: self.op_start,
            message: message.into(),
        }
    }

    /// Executes opcodes up to STOP and returns the object it returns.
    fn run(&mut self) -> Result<Id, PtError> {
        loop {
            self.op_start = self.pos;
            let op = self.take(1)?[0];
            match op {
                PROTO => {
                    let version = self.take(1)?[0];
                    if version > 5 {
                        return Err(self.fail(format!("unsupported protocol {version}")));
                    }
                }
                FRAME => {
                    self.take(8)?;
                }
                STOP => return self.pop(),
                MARK => self.marks.push(self.stack.len()),
                NONE => self.push(Node::None),
                NEWTRUE => self.push(Node::Bool(true)),
                NEWFALSE => self.push(Node::Bool(false)),
                BININT => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()));
                }
                BININT1 => {
                    let v = self.take(1)?[0];
                    self.push(Node::Int(v.into()));
                }
                BININT2 => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()));
                }
                LONG1 => {
                    let len = usize::from(self.take(1)?[0]);
                    let v = self.long(len)?;
                    self.push(Node::Int(v));
                }
                BINFLOAT => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Node::Float(v));
                }
                SHORT_BINUNICODE | SHORT_BINSTRING => {
                    let len = usize::from(self.take(1)?[0]);
                    self.string(len)?;
                }
                BINUNICODE => {
                    let len = u32::from_le_bytes(self.array()?);
                    self.string(len as usize)?;
                }
                BINUNICODE8 => {
                    let len = u64::from_le_bytes(self.array()?);
                    self.string(usize::try_from(len).unwrap_or(usize::MAX))?;
                }
                EMPTY_TUPLE => self.push(Node::Tuple(Vec::new())),
                TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1 + 1);
                    let items = self.pop_n(n)?;
                    self.push(Node::Tuple(items));
                }
                EMPTY_LIST => self.push(Node::List(Vec::new())),
                APPEND => {
                    let item = self.pop()?;
                    self.list_mut()?.push(item);
                }
                APPENDS => {
                    let items = self.pop_mark()?;
                    self.list_mut()?.extend(items);
                }
                EMPTY_DICT => self.push(Node::Dict(Vec::new())),
                SETITEM => {
                    let pair = self.pop_n(2)?;
                    self.dict_mut()?.push((pair[0], pair[1]));
                }
                SETITEMS => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.fail("SETITEMS with an odd number of items"));
                    }
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1]));
                    self.dict_mut()?.extend(pairs);
                }
                BINPUT => {
                    let key = self.take(1)?[0];
                    self.memo_put(key.into())?;
                }
                LONG_BINPUT => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_put(key)?;
                }
                MEMOIZE => {
                    let key =
                        u32::try_from(self.memo.len()).map_err(|_| self.fail("memo is full"))?;
                    self.memo_put(key)?;
                }
                BINGET => {
                    let key = self.take(1)?[0];
                    self.memo_get(key.into())?;
                }
                LONG_BINGET => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_get(key)?;
                }
                GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                STACK_GLOBAL => {
                    let pair = self.pop_n(2)?;
                    let module = self.str_at(pair[0])?.to_owned();
                    let name = self.str_at(pair[1])?.to_owned();
                    self.global(&module, &name)?;
                }
                REDUCE => self.reduce()?,
                BUILD => self.build()?,
                BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.storage(pid)?;
                    self.push(storage);
                }
                _ => {
                    return Err(PtError::Opcode {
                        opcode: op,
                        offset: self.op_start,
                    });
                }
            }
        }
    }

    /// The next `n` bytes of the pickle.
    fn take(&mut self, n: usize) -> Result<&'a [u8], PtError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or(PtError::PickleTruncated(self.pos))?;
        let data: &'a [u8] = self.data;
        self.pos = end;
        let bytes = &data[end - n..end];
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PtError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A newline-terminated ASCII line (GLOBAL operands).
    fn line(&mut self) -> Result<&'a str, PtError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(len) = rest.iter().take(MAX_LINE).position(|&b| b == b'\n') else {
            return Err(if rest.len() < MAX_LINE {
                PtError::PickleTruncated(self.data.len())
            } else {
                self.fail("global name too long")
            });
        };
        let line = &self.take(len + 1)?[..len];
        std::str::from_utf8(line).map_err(|_| self.fail("global name is not utf-8"))
    }

    /// A `len`-byte little-endian two's complement integer (LONG1).
    fn long(&mut self, len: usize) -> Result<i64, PtError> {
        let bytes = self.take(len)?;
        if len > 8 {
            return Err(self.fail("integer does not fit in 64 bits"));
        }
        let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut le = [if negative { 0xFF } else { 0 }; 8];
        le[..len].copy_from_slice(bytes);
        Ok(i64::from_le_bytes(le))
    }

    fn string(&mut self, len: usize) -> Result<(), PtError> {
        let bytes = self.take(len)?.to_vec();
        let s = String::from_utf8(bytes).map_err(|_| self.fail("string is not valid utf-8"))?;
        self.push(Node::Str(s));
        Ok(())
    }

    fn push(&mut self, node: Node) {
        self.stack.push(self.nodes.len());
        self.nodes.push(node);
    }

    /// Bottom of the part of the stack above the innermost MARK.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, PtError> {
        self.pop_n(1).map(|items| items[0])
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>, PtError> {
        if self.stack.len() < self.floor() + n {
            return Err(self.fail("stack underflow"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, PtError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.fail("no MARK to pop"))?;
        Ok(self.stack.split_off(mark))
    }

    fn top(&self) -> Result<Id, PtError> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.floor() => Ok(id),
            _ => Err(self.fail("stack underflow")),
        }
    }

    fn list_mut(&mut self) -> Result<&mut Vec<Id>, PtError> {
        let (id, offset) = (self.top()?, self.op_start);
        match &mut self.nodes[id] {
            Node::List(items) => Ok(items),
            other => Err(PtError::Pickle {
                offset,
                message: format!("cannot append to {}", other.type_name()),
            }),
        }
    }

    fn dict_mut(&mut self) -> Result<&mut Vec<(Id, Id)>, PtError> {
        let (id, offset) = (self.top()?, self.op_start);
        match &mut self.nodes[id] {
            Node::Dict(entries) => Ok(entries),
            other => Err(PtError::Pickle {
                offset,
                message: format!("cannot set items on {}", other.type_name()),
            }),
        }
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PtError> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PtError> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.fail(format!("memo key {key} not found")))?;
        self.stack.push(id);
        Ok(())
    }

    fn str_at(&self, id: Id) -> Result<&str, PtError> {
        match &self.nodes[id] {
            Node::Str(s) => Ok(s),
            other => Err(self.fail(format!("expected str, found {}", other.type_name()))),
        }
    }

    fn int_at(&self, id: Id, what: &str) -> Result<u64, PtError> {
        match &self.nodes[id] {
            Node::Int(i) => {
                u64::try_from(*i).map_err(|_| self.fail(format!("negative {what} {i}")))
            }
            other => Err(self.fail(format!("{what} is {}, not int", other.type_name()))),
        }
    }

    fn tuple_at(&self, id: Id, what: &str) -> Result<&[Id], PtError> {
        match &self.nodes[id] {
            Node::Tuple(items) => Ok(items),
            other => Err(self.fail(format!("{what} is {}, not tuple", other.type_name()))),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PtError> {
        let global = match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch", class) => match PtDtype::from_storage_class(class) {
                Some(dtype) => Global::Storage(dtype),
                None => return Err(PtError::Global(format!("{module}.{name}"))),
            },
            _ => return Err(PtError::Global(format!("{module}.{name}"))),
        };
        self.push(Node::Global(global));
        Ok(())
    }

    /// REDUCE: calls the callable below the top with the argument tuple on top.
    fn reduce(&mut self) -> Result<(), PtError> {
        let args = self.pop()?;
        let func = self.top()?;
        let args = self.tuple_at(args, "REDUCE argument")?.to_vec();
        let result = match self.nodes[func] {
            Node::Global(Global::OrderedDict) if args.is_empty() => Node::Dict(Vec::new()),
            Node::Global(Global::RebuildTensorV2) => Node::Tensor(self.rebuild_tensor(&args)?),
            ref other => return Err(self.fail(format!("cannot call {}", other.type_name()))),
        };
        self.stack.pop();
        self.push(result);
        Ok(())
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride,
    /// requires_grad, backward_hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[Id]) -> Result<TensorRef, PtError> {
        if !(6..=7).contains(&args.len()) {
            return Err(self.fail(format!("_rebuild_tensor_v2 with {} arguments", args.len())));
        }
        let Node::Storage { dtype, key, numel } = &self.nodes[args[0]] else {
            return Err(self.fail("tensor without a storage"));
        };
        let offset = self.int_at(args[1], "storage offset")?;
        let dims = |id, what| -> Result<Vec<usize>, PtError> {
            self.tuple_at(id, what)?
                .iter()
                .map(|&d| {
                    let v = self.int_at(d, what)?;
                    usize::try_from(v).map_err(|_| self.fail(format!("{what} {v} too large")))
                })
                .collect()
        };
        let shape = dims(args[2], "size")?;
        let stride = dims(args[3], "stride")?;
        if let Some(&metadata) = args.get(6)
            && !matches!(&self.nodes[metadata], Node::Dict(entries) if entries.is_empty())
        {
            return Err(PtError::Unsupported("tensor metadata".into()));
        }
        TensorRef::new(*dtype, key.clone(), *numel, offset, shape, stride)
    }

    /// BUILD: only the no-op state an `OrderedDict` may carry.
    fn build(&mut self) -> Result<(), PtError> {
        let state = self.pop()?;
        let target = self.top()?;
        let empty_state = match &self.nodes[state] {
            Node::None => true,
            Node::Dict(entries) => entries.is_empty(),
            _ => false,
        };
        if matches!(self.nodes[target], Node::Dict(_)) && empty_state {
            Ok(())
        } else {
            Err(self.fail(format!(
                "BUILD of {} with {} state is not supported",
                self.nodes[target].type_name(),
                self.nodes[state].type_name()
            )))
        }
    }

    /// BINPERSID: `('storage', torch.<Type>Storage, key, location, numel)`.
    fn storage(&self, pid: Id) -> Result<Node, PtError> {
        let items = self.tuple_at(pid, "persistent id")?;
        let [kind, class, key, _location, numel] = items else {
            return Err(self.fail(format!("persistent id with {} items", items.len())));
        };
        if self.str_at(*kind)? != "storage" {
            return Err(self.fail("persistent id is not a storage"));
        }
        let Node::Global(Global::Storage(dtype)) = self.nodes[*class] else {
            return Err(self.fail("storage type is not a torch storage class"));
        };
        Ok(Node::Storage {
            dtype,
            key: self.str_at(*key)?.to_owned(),
            numel: self.int_at(*numel, "storage size")?,
        })
    }

    /// Turns the object `id` into a tree, spending one unit of `budget` per node.
    fn unfold(&self, id: Id, depth: usize, budget: &mut usize) -> Result<PtSkeleton, PtError> {
        if depth > MAX_DEPTH {
            return Err(PtError::Limit(format!(
                "value nested deeper than {MAX_DEPTH} levels"
            )));
        }
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| PtError::Limit("shared references expand to too many values".into()))?;
        let unfold_all = |items: &[Id], budget: &mut usize| {
            items
                .iter()
                .map(|&item| self.unfold(item, depth + 1, budget))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match &self.nodes[id] {
            Node::None => PtTree::None,
            Node::Bool(b) => PtTree::Bool(*b),
            Node::Int(i) => PtTree::Int(*i),
            Node::Float(x) => PtTree::Float(*x),
            Node::Str(s) => PtTree::Str(s.clone()),
            Node::List(items) => PtTree::List(unfold_all(items, budget)?),
            Node::Tuple(items) => PtTree::Tuple(unfold_all(items, budget)?),
            Node::Dict(entries) => {
                let mut out: Vec<(String, PtSkeleton)> = Vec::with_capacity(entries.len());
                let mut index: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
                for &(key, value) in entries {
                    let Node::Str(key) = &self.nodes[key] else {
                        return Err(PtError::Unsupported(format!(
                            "dict key of type {}",
                            self.nodes[key].type_name()
                        )));
                    };
                    let value = self.unfold(value, depth + 1, budget)?;
                    // Python keeps a re-assigned key at its first position.
                    match index.get(key.as_str()) {
                        Some(&i) => out[i].1 = value,
                        None => {
                            index.insert(key.as_str(), out.len());
                            out.push((key.clone(), value));
                        }
                    }
                }
                PtTree::Dict(out)
            }
            Node::Tensor(t) => PtTree::Tensor(t.clone()),
            Node::Global(_) | Node::Storage { .. } => {
                return Err(PtError::Unsupported(format!(
                    "{} object in the pickle's result",
                    self.nodes[id].type_name()
                )));
            }
        })
    }
}
