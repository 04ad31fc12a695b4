//! The capture coordinator: turns run requests into jobs and hands them to
//! workers; filled in by the distributed-capture issue.
