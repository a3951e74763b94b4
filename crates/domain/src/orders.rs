//! Order rules: states, transitions and queue order.
