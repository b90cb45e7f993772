mod activation;
mod base;
mod bool_tensor;
mod int_tensor;
mod module;
mod qtensor;
mod tensor;
mod transaction;

pub(crate) use base::*;
pub(crate) use module::{conv2d_gradients, shim_error};
