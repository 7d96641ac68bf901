//! Simulated counterparties of the appliance: what terminals, switches and banks
//! do on their side, in software, so the demo, the tests and the bench can drive
//! the real appliance end to end.

pub mod terminal;
