//! Bridges with a real Dendrite: the scenarios of the Synapse ones. An
//! application service registered with Dendrite registers its puppets
//! through the gate — both token forms, a burst of 100 under tight
//! per-client limits — while a wrong token and a name outside its
//! namespace are refused by the gate before Dendrite. Without the
//! registration file in the gate, the same requests go to Dendrite, which
//! refuses them itself. Dendrite lower-cases the names it registers.

use crate::appservice::{
    assert_registrations_counted, both_token_forms_register, gate_with, register_burst,
    register_puppet, registration_file, toml_item, without_the_file_the_homeserver_decides,
    wrong_requests_are_refused, AS_TOKEN,
};
use crate::dendrite::Dendrite;
use crate::synapse::SERVER_NAME;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_registers_its_puppets_through_the_gate_in_front_of_dendrite() {
    let file = registration_file("dendrite");
    // Dendrite's own `/register` limiter is off (see `Dendrite::start`):
    // through the gate every puppet comes from one address.
    let dendrite = Dendrite::start(&[&file]).await;
    let gate = gate_with(&dendrite.url(), &toml_item(&file), "").await;
    let base = gate.url("");
    both_token_forms_register(&base, &dendrite.url(), "").await;

    // Refused by the gate: Dendrite never sees them.
    wrong_requests_are_refused(&base, &dendrite.url(), true).await;

    // 100 puppets, eight at a time, with limits of 3 attempts and 1
    // registration per client.
    register_burst(&base, &dendrite.url(), 100).await;

    // The gate passes the name as sent; Dendrite registers it lower-cased.
    let answer = register_puppet(&base, "_testbridge_Upper", AS_TOKEN, false).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.json()["user_id"],
        format!("@_testbridge_upper:{SERVER_NAME}")
    );
    assert_registrations_counted(&gate, 103).await;

    // Without the file the gate forwards, and Dendrite itself refuses a
    // wrong token (401 M_UNKNOWN_TOKEN) and a foreign name (400
    // M_EXCLUSIVE); a right one registers.
    without_the_file_the_homeserver_decides(&dendrite.url()).await;
    let _ = std::fs::remove_file(file);
}
