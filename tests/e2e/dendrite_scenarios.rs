//! The homeserver-generic scenarios (`scenarios/`) against a real Dendrite
//! v0.13.8: each test starts its own Dendrite (sqlite, open registration,
//! guests allowed as its generated configuration has them, its own
//! `/register` limiter off) and its own gates in front of it.

use crate::dendrite::Dendrite;
use crate::scenarios::{clients, guests, names, routes, uia, Homeserver};

/// A fresh Dendrite and its handle for the scenarios.
async fn dendrite() -> (Dendrite, Homeserver) {
    let dendrite = Dendrite::start(&[]).await;
    let hs = Homeserver::dendrite(dendrite.url());
    (dendrite, hs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_refused_names_never_become_accounts() {
    let (_dendrite, hs) = dendrite().await;
    names::refused_names_never_become_accounts(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_every_uia_step_is_checked() {
    let (_dendrite, hs) = dendrite().await;
    uia::every_uia_step_is_checked(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_the_audited_name_is_the_account_made() {
    let (_dendrite, hs) = dendrite().await;
    clients::the_audited_name_is_the_account_made(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_guests_follow_the_guest_policy() {
    let (_dendrite, hs) = dendrite().await;
    guests::guests_follow_the_guest_policy(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_a_guest_token_upgrades_nothing() {
    let (_dendrite, hs) = dendrite().await;
    guests::a_guest_token_upgrades_nothing(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_a_user_without_a_password() {
    let (_dendrite, hs) = dendrite().await;
    guests::a_user_without_a_password(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_availability_is_answered_by_the_gate_or_for_the_mapped_name() {
    let (_dendrite, hs) = dendrite().await;
    routes::availability_is_answered_by_the_gate_or_for_the_mapped_name(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_every_spelling_of_register_is_guarded() {
    let (_dendrite, hs) = dendrite().await;
    routes::every_spelling_of_register_is_guarded(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dendrite_matrix_nio_registers_syncs_and_logs_in() {
    let (_dendrite, hs) = dendrite().await;
    clients::matrix_nio_registers_syncs_and_logs_in(&hs).await;
}
