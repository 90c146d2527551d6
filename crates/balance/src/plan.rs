//! The order in which a request tries its candidates.
//!
//! Candidates come in groups (a group is a cluster: this cluster's
//! endpoints, or a remote cluster reached through the gateway), each with a
//! priority level (lower first: same cluster, same region, others — or an
//! operator's explicit list) and a weight (canary splits). The plan:
//!
//! 1. groups that are healthy (not ejected, and with a member that is not
//!    ejected) come first, by level; within a level in weighted random
//!    order, so weights split traffic and the rest are the fallbacks;
//! 2. within a group, power of two choices picks the first member (the
//!    cheaper of two random ones by [`crate::Load::cost`]), the others
//!    follow by cost, ejected members last;
//! 3. ejected groups go last: a request only reaches them when everything
//!    healthy failed first, and if every group is ejected the plan still
//!    tries them (failing open beats refusing every request).

use rand::Rng;

/// One member of a group, as the plan sees it.
#[derive(Debug, Clone)]
pub struct Candidate<M> {
    pub item: M,
    /// Lower is better (see [`crate::Load::cost`]).
    pub cost: f64,
    pub ejected: bool,
}

#[derive(Debug, Clone)]
pub struct Group<M> {
    pub level: u32,
    pub weight: u32,
    /// The whole group is out (a remote cluster's outlier ejection).
    pub ejected: bool,
    pub members: Vec<Candidate<M>>,
}

impl<M> Group<M> {
    fn healthy(&self) -> bool {
        !self.ejected && self.members.iter().any(|m| !m.ejected)
    }
}

/// At most `max` candidates, in the order to try them.
pub fn plan<M, R: Rng>(groups: Vec<Group<M>>, max: usize, rng: &mut R) -> Vec<M> {
    // Efraimidis–Spirakis: sorting by u^(1/w) is weighted sampling without
    // replacement; weight 0 sorts after every weighted group.
    let mut keyed: Vec<(bool, u32, f64, Group<M>)> = groups
        .into_iter()
        .map(|g| {
            let key = if g.weight == 0 {
                -1.0
            } else {
                rng.gen::<f64>().powf(1.0 / f64::from(g.weight))
            };
            (!g.healthy(), g.level, key, g)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.total_cmp(&a.2)));
    let mut out = Vec::new();
    for (_, _, _, g) in keyed {
        if out.len() >= max {
            break;
        }
        order_members(g.members, rng, &mut out);
    }
    out.truncate(max);
    out
}

fn order_members<M, R: Rng>(members: Vec<Candidate<M>>, rng: &mut R, out: &mut Vec<M>) {
    let (mut ok, mut out_members): (Vec<_>, Vec<_>) = members.into_iter().partition(|m| !m.ejected);
    if ok.len() >= 2 {
        let a = rng.gen_range(0..ok.len());
        let mut b = rng.gen_range(0..ok.len() - 1);
        if b >= a {
            b += 1;
        }
        let first = if ok[b].cost < ok[a].cost { b } else { a };
        let pick = ok.swap_remove(first);
        ok.sort_by(|x, y| x.cost.total_cmp(&y.cost));
        ok.insert(0, pick);
    }
    out_members.sort_by(|x, y| x.cost.total_cmp(&y.cost));
    out.extend(ok.into_iter().chain(out_members).map(|m| m.item));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn c(item: &'static str, cost: f64) -> Candidate<&'static str> {
        Candidate {
            item,
            cost,
            ejected: false,
        }
    }

    fn g(level: u32, weight: u32, members: Vec<Candidate<&'static str>>) -> Group<&'static str> {
        Group {
            level,
            weight,
            ejected: false,
            members,
        }
    }

    #[test]
    fn levels_come_in_order_and_ejected_groups_last() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut west = g(1, 1, vec![c("west", 1.0)]);
        west.ejected = true;
        let groups = vec![
            g(2, 1, vec![c("north", 1.0)]),
            west,
            g(0, 1, vec![c("e1", 1.0), c("e2", 1.0)]),
        ];
        let p = plan(groups, 10, &mut rng);
        assert_eq!(p.len(), 4);
        assert!(p[..2].contains(&"e1") && p[..2].contains(&"e2"));
        assert_eq!(&p[2..], &["north", "west"]);
    }

    #[test]
    fn a_group_whose_members_are_all_ejected_is_not_healthy() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut local = g(0, 1, vec![c("e1", 1.0)]);
        local.members[0].ejected = true;
        let p = plan(vec![local, g(1, 1, vec![c("west", 1.0)])], 10, &mut rng);
        assert_eq!(p, vec!["west", "e1"]);
    }

    #[test]
    fn everything_ejected_still_yields_a_plan() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut a = g(0, 1, vec![c("a", 1.0)]);
        a.ejected = true;
        let mut b = g(1, 1, vec![c("b", 1.0)]);
        b.ejected = true;
        assert_eq!(plan(vec![b, a], 10, &mut rng), vec!["a", "b"]);
    }

    #[test]
    fn weights_split_traffic_within_a_level() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut firsts = std::collections::HashMap::new();
        for _ in 0..10_000 {
            let p = plan(
                vec![
                    g(0, 90, vec![c("stable", 1.0)]),
                    g(0, 10, vec![c("canary", 1.0)]),
                    g(0, 0, vec![c("off", 1.0)]),
                ],
                3,
                &mut rng,
            );
            assert_eq!(p[2], "off", "weight 0 is only a fallback");
            *firsts.entry(p[0]).or_insert(0) += 1;
        }
        let canary = firsts.get("canary").copied().unwrap_or(0);
        assert!(
            (800..=1200).contains(&canary),
            "canary first {canary} of 10000"
        );
    }

    #[test]
    fn two_choices_avoid_the_loaded_member() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut slow_first = 0;
        for _ in 0..3_000 {
            let p = plan(
                vec![g(0, 1, vec![c("a", 1.0), c("b", 1.0), c("slow", 50.0)])],
                3,
                &mut rng,
            );
            assert_eq!(p.len(), 3);
            if p[0] == "slow" {
                slow_first += 1;
            }
        }
        // Only when both random picks are "slow" — impossible with distinct picks.
        assert_eq!(slow_first, 0);
    }

    #[test]
    fn max_bounds_the_plan() {
        let mut rng = StdRng::seed_from_u64(6);
        let p = plan(
            vec![
                g(0, 1, vec![c("a", 1.0), c("b", 1.0), c("c", 1.0)]),
                g(1, 1, vec![c("d", 1.0)]),
            ],
            2,
            &mut rng,
        );
        assert_eq!(p.len(), 2);
        assert!(plan::<&str, _>(vec![], 4, &mut rng).is_empty());
    }
}
