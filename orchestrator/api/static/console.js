// Live updates for the console's pages; every page reads fine without this script.
"use strict";
(function () {
  // A region whose server-rendered HTML the server pushes again when it changes.
  document.querySelectorAll("[data-live]").forEach(function (region) {
    var source = new EventSource(region.getAttribute("data-live"));
    source.addEventListener(region.getAttribute("data-event"), function (event) {
      region.innerHTML = event.data;  // rendered and escaped by the server
    });
  });
  // A task's logs, followed until it ends.
  var logs = document.querySelector("pre[data-follow]");
  if (logs) {
    var follow = new EventSource(logs.getAttribute("data-follow"));
    var note = document.getElementById("logs-live");
    follow.addEventListener("log", function (event) {
      var line = JSON.parse(event.data);
      logs.appendChild(document.createTextNode(line.text));
      logs.scrollTop = logs.scrollHeight;
    });
    follow.addEventListener("end", function () {
      follow.close();
      if (note) { note.textContent = "The task has ended."; }
      setTimeout(function () { window.location.reload(); }, 300);  // its receipt, its end
    });
  }
})();
